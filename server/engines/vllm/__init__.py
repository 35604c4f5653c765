"""The vLLM engines, in the worker process (vLLM is optional: importing these modules does not import it)."""
