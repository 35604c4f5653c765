"""The FastAPI application: routers per resource, one error mapping, limits, metrics."""
