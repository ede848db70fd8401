# rollout-proxy container image.
#
#   docker build -t rollout-proxy:0.1.0 .
#   docker run -v "$PWD/config/deploy/routing.container.yaml:/etc/rollout-proxy/routing.yaml:ro" \
#     -e ROLLOUT_ADMIN_TOKEN -p 8080:8080 -p 127.0.0.1:9090:9090 rollout-proxy:0.1.0
#
# The config the image ships is config/deploy/routing.container.yaml; mount your own over
# /etc/rollout-proxy/routing.yaml. It must listen on 0.0.0.0 (traffic 8080, admin 9090) so
# that probes and Prometheus reach the proxy from outside the container.
#
# .ci/dockerfile-steps runs the builder stage's COPY and RUN steps outside a container (no
# Docker engine in CI): keep this stage to COPY and RUN lines that use /src, /opt/venv and
# /tmp/wheels, which that script maps into a temporary directory.

# Exact patch release; bump it deliberately, with the pins in config/deploy/requirements.txt.
FROM python:3.11.17-slim-bookworm AS builder

WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first, in their own layer: they change less often than the code.
COPY config/deploy/requirements.txt ./requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir --requirement requirements.txt
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
# Build a wheel and install only it (its dependencies are already pinned above); `pip check`
# fails the build when pyproject.toml gained a dependency that requirements.txt does not pin.
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && /opt/venv/bin/pip check


FROM python:3.11.17-slim-bookworm

# AIOHTTP_NO_EXTENSIONS is never set: the pure-Python HTTP parser accepts requests that the C
# parser (llhttp) rejects, which a proxy must not do (shared/PITFALLS.md).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}"

# A fixed uid/gid so that volumes and Kubernetes' runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10001 rollout \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/rollout-proxy --shell /usr/sbin/nologin rollout \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/rollout-proxy \
       /var/lib/rollout-proxy/state /var/lib/rollout-proxy/traces

COPY --from=builder /opt/venv /opt/venv
COPY config/deploy/routing.container.yaml /etc/rollout-proxy/routing.yaml

WORKDIR /var/lib/rollout-proxy
USER 10001:10001

# State (state.path) and comparison traces (telemetry.trace_file) live here.
VOLUME ["/var/lib/rollout-proxy"]
# 8080: client traffic. 9090: admin (/healthz, /readyz, /metrics, /admin/*).
EXPOSE 8080 9090

# No curl in a slim image; urlopen raises (exit 1) on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

# Exec form: the proxy is PID 1 and receives SIGTERM itself; it installs its own SIGTERM and
# SIGINT handlers (turn /readyz to 503, drain up to limits.drain_timeout_s, exit 0), so the
# kernel's "PID 1 ignores signals without a handler" rule does not bite, and it starts no
# child processes whose orphans would need reaping: no tini needed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rollout-proxy"]
CMD ["serve", "--config", "/etc/rollout-proxy/routing.yaml"]
