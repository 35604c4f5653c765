"""The decomposition pipelines (fast, dsg), written once over a small decoding backend; their output schemas
and parsing."""
