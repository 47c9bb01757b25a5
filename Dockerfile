# syntax=docker/dockerfile:1
# Build stage: a wheel of the sidecar (the agent definitions travel inside it).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapter ./adapter
COPY conductor-agents ./conductor-agents
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: slim, no compilers, no source tree, not root.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin adapter
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
ENV ADAPTER_HOST=0.0.0.0 \
    ADAPTER_PORT=8080 \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json
EXPOSE 8080
# The image has no curl: Python's standard library probes the liveness route.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
# uvicorn drains in-flight requests on SIGTERM (SHUTDOWN_GRACE_SECONDS), then exits.
STOPSIGNAL SIGTERM
CMD ["adapter", "serve", "--host", "0.0.0.0", "--port", "8080"]
