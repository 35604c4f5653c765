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
VOLUME ["/models"]
CMD ["dvreward", "worker", "--devices", "all"]
