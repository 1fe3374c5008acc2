# keybrake proxy image.
#   docker build -t ghcr.io/keybrake/keybrake:0.2.0 .
#   docker run --rm -p 8080:8080 -e KEYBRAKE_API_KEY=... ghcr.io/keybrake/keybrake:0.2.0
# Secrets are never baked in: they come from the environment at run time (Kubernetes Secrets,
# see templates/proxy/ and docs/deploy.md).
#
# Base image: a pinned patch release of python:3.12-slim. Bump it deliberately, or pin a digest
# with --build-arg PYTHON_IMAGE=python:3.12.12-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

# ---- build: install the project and its dependencies into a self-contained venv -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the package build needs (see .dockerignore and [tool.setuptools] in pyproject.toml).
COPY pyproject.toml README.md LICENSE ./
COPY cli ./cli
COPY proxy ./proxy
COPY hera_workflows ./hera_workflows
COPY reaper ./reaper
COPY adopt ./adopt
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/keybrake --help >/dev/null

# ---- runtime: the venv and nothing else; no compilers, no pip cache, no source tree ---------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 keybrake \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/keybrake --shell /usr/sbin/nologin keybrake \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/keybrake
COPY --from=build /opt/venv /opt/venv
# Writable working directory for the embedded default (sqlite:///keybrake.db) in `docker run`;
# in Kubernetes KEYBRAKE_DATABASE_URL points at PostgreSQL and the root filesystem is read-only.
WORKDIR /var/lib/keybrake
USER 10001:10001
EXPOSE 8080
# Docker-level health only (Kubernetes ignores it and uses its own probes). The slim image has
# no curl: use the stdlib. urlopen raises on a non-2xx answer, which exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["keybrake"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
