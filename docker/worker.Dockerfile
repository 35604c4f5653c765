# CUDA worker image: torch + transformers engines; models come from the shared HF cache volume.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# EXTRAS=server,vllm adds vLLM for DVREWARD_VERIFIER_ENGINE / DVREWARD_DECOMPOSER_ENGINE=vllm.
ARG EXTRAS=server
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY trainer_client ./trainer_client
RUN pip install "torch>=2.5,<2.15" --index-url https://download.pytorch.org/whl/cu128 \
    && pip install ".[${EXTRAS}]"
VOLUME ["/models"]
CMD ["dvreward", "worker"]
