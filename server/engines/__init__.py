"""Model engines: a narrow verifier / decomposer interface and its implementations."""
