"""Every engine default, written once: Settings' fields and the engines' own keyword defaults both read these.

Plain values that import nothing of the project, so the engines and the bench scripts keep them
where pydantic (and so Settings) is absent, as on a bare GPU machine.
"""

from typing import Final

DEVICE: Final = "cpu"
DTYPE: Final = "float32"
VERIFIER_MODE: Final = "packed"
MAX_BATCH_TOKENS: Final = 32768  # tokens in one verifier forward pass
BATCHED_VISION: Final = True
PIPELINE: Final = "fast"
REMOTE_CONCURRENCY: Final = 16
REMOTE_TIMEOUT_S: Final = 60.0
REMOTE_RETRIES: Final = 3
VLLM_TENSOR_PARALLEL_SIZE: Final = 1
VLLM_GPU_MEMORY_UTILIZATION: Final = 0.9
