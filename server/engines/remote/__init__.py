"""The engines on an OpenAI-compatible server (vLLM serve, SGLang, a hosted API), over HTTP."""
