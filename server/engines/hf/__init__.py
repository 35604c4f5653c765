"""The transformers engines: the packed verifier and the decomposer, in the worker process."""
