# hangup: slim, non-root, exec-form entrypoint, hash-locked dependencies.
#   docker build -t hangup .
#   docker run -p 8080:8080 -v "$PWD/my.yaml:/etc/hangup/hangup.yaml:ro" hangup
#   docker run -p 8080:8080 -e OPENAI_API_KEY -e HANGUP_CONFIG=/etc/hangup/other.yaml ... hangup
# There is no Docker engine on the CI machines: tests/test_docker_steps.py runs this file's
# build-stage COPY and RUN steps and its ENTRYPOINT + CMD in a fresh virtualenv instead, so
# keep every RUN a plain shell command over the paths below.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/docker/build-requirements.txt deploy/docker/requirements.txt ./
# Two virtualenvs. /opt/build holds pip and the build backend; /opt/hangup, the only one shipped,
# gets the hash-checked runtime lock and hangup itself, and no pip or setuptools.
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --no-deps -r build-requirements.txt \
    && python -m venv --without-pip /opt/hangup \
    && /opt/build/bin/pip --python /opt/hangup/bin/python install --require-hashes --no-deps -r requirements.txt
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /src/dist . \
    && /opt/build/bin/pip --python /opt/hangup/bin/python install --no-deps /src/dist/hangup-*.whl

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/hangup/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HANGUP_CONFIG=/etc/hangup/hangup.yaml
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a name lookup.
RUN groupadd --system --gid 10001 hangup \
    && useradd --system --uid 10001 --gid hangup --no-create-home --shell /usr/sbin/nologin hangup
COPY --from=build /opt/hangup /opt/hangup
# The default config: mount your own over it, or point HANGUP_CONFIG elsewhere.
COPY config/hangup.yaml /etc/hangup/hangup.yaml
USER 10001:10001
EXPOSE 8080
# Liveness, not readiness: a draining proxy (readiness 503) is healthy and must not be restarted.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["hangup"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
