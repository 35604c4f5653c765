# Slim API image: FastAPI + Redis client, no torch. Workers do the model work.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY trainer_client ./trainer_client
COPY dvreward_protocol ./dvreward_protocol
RUN pip install ".[api]"
RUN useradd --create-home --uid 10001 dvreward
USER dvreward
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["dvreward", "api", "--host", "0.0.0.0", "--port", "8000"]
