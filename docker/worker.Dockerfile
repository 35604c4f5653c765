# GPU worker image: torch + transformers engines; models come from the shared HF cache volume.
# The base's own Python is the project's (3.11 on Debian bookworm); the CUDA runtime comes with the
# torch cu128 wheels, so the image needs only the host's NVIDIA driver (NVIDIA container toolkit).
FROM python:3.11-slim-bookworm
# EXTRAS=server,vllm adds vLLM for DVREWARD_VERIFIER_ENGINE / DVREWARD_DECOMPOSER_ENGINE=vllm.
ARG EXTRAS=server
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/models \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY trainer_client ./trainer_client
COPY dvreward_protocol ./dvreward_protocol
RUN pip install "torch>=2.5,<2.15" --index-url https://download.pytorch.org/whl/cu128 \
    && pip install ".[${EXTRAS}]"
# Not root. The model cache belongs to the worker's user before it becomes a volume, so that a fresh named
# volume starts with that owner and the hub can write to it.
RUN useradd --create-home --uid 1000 dvreward && mkdir -p /models && chown dvreward:dvreward /models
USER dvreward
VOLUME ["/models"]
# Healthy while a worker process of this container is in the registry with a live heartbeat; the start period
# covers a first download and load of 7B checkpoints.
HEALTHCHECK --interval=30s --timeout=15s --start-period=20m --retries=3 CMD ["dvreward", "worker-health"]
CMD ["dvreward", "worker", "--devices", "all"]
