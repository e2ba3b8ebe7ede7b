# hangup: slim, non-root, exec-form entrypoint. Build: docker build -t hangup .
# Run:  docker run -p 8080:8080 -e OPENAI_API_KEY hangup --upstream https://api.openai.com/v1
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HANGUP_CONFIG=/etc/hangup/hangup.yaml

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-compile . \
    && useradd --system --uid 10001 --no-create-home hangup
COPY config/hangup.yaml /etc/hangup/hangup.yaml

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2); sys.exit(0)"]
ENTRYPOINT ["hangup"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
