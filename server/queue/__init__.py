"""Task queues between the API and the workers: one interface, in-process and Redis Streams."""
