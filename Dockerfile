# Phoenix Gateway container image.
#
#   docker build -t phoenix-gateway .
#   docker run -p 127.0.0.1:8080:8080 -v "$PWD/phoenix:/etc/phoenix:ro" phoenix-gateway
#
# The config is read from /etc/phoenix/gateway.yaml (PHOENIX_CONFIG): mount the directory that holds
# it, not the file alone, whose mount keeps the version the container started with once an editor
# saves a new file in its place (a reload, SIGHUP, would read the old one); run with `-e PHOENIX_CONFIG=`
# to build it from the environment instead (OLLAMA_BASE_URL, OPENAI_API_KEY, ...). The container
# always listens on 0.0.0.0:8080, whatever `server.host` and `server.port` the config says.
# tests/deploy/test_dockerfile.py checks these instructions; README.md, Deployment, says how to run it.

# Build stage: the project and its dependencies installed into a virtual environment, which is
# all the runtime stage copies (no pip cache, no build tools, no sources).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/phoenix
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY gateway ./gateway
RUN /opt/phoenix/bin/pip install -c constraints.txt .

FROM python:3.11-slim
ENV PATH=/opt/phoenix/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PHOENIX_CONFIG=/etc/phoenix/gateway.yaml
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can check it. /var/lib/phoenix is where
# the compose file keeps the audit file (privacy.audit_log); a volume mounted there inherits the
# ownership.
RUN groupadd --system --gid 10001 phoenix \
    && useradd --system --uid 10001 --gid phoenix --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin phoenix \
    && mkdir -p /etc/phoenix /var/lib/phoenix \
    && chown phoenix:phoenix /var/lib/phoenix
COPY --from=build /opt/phoenix /opt/phoenix
USER 10001:10001
EXPOSE 8080
# slim has no curl: the image's own Python asks /healthz; urlopen raises (exit 1) on a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["phoenix-gateway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
