# One image for every role: web, worker, beat, flower, migrate (deploy/image/entrypoint.sh).
# Build: docker build --build-arg VERSION=$(git describe --always) --build-arg REVISION=$(git rev-parse HEAD) .

# --- build: dependencies in their own layer, then the code, byte-compiled, static files collected
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

WORKDIR /app
COPY manage.py ./
COPY project ./project
COPY app ./app
COPY deploy/image/entrypoint.sh ./entrypoint.sh

# The build needs settings to import, not a real secret: this key exists only in this step.
RUN DJANGO_SECRET_KEY=collectstatic-only-not-a-secret DJANGO_STATIC_ROOT=/app/staticfiles \
        /opt/venv/bin/python manage.py collectstatic --noinput --verbosity 0 \
    && /opt/venv/bin/python -m compileall -q -j 0 /app

# --- runtime: the venv and the code, no compilers or build tools, a numeric non-root user
FROM python:3.11-slim-bookworm AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="django-celery-k8s" \
      org.opencontainers.image.description="Django + Celery: web, worker, beat and flower from one image" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

# Every writable path defaults under /tmp (an emptyDir in Kubernetes): the root filesystem
# can be read-only. gunicorn's worker heartbeat files go to /dev/shm (memory).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    APP_RUNTIME_DIR=/tmp \
    DJANGO_STATIC_ROOT=/app/staticfiles \
    APP_VERSION=${VERSION}

WORKDIR /app
USER 10001:10001
# web 8000, flower 5555, Prometheus metrics 9808 (web, worker and beat)
EXPOSE 8000 5555 9808

# Kubernetes probes, one set per role, replace a single image-wide HEALTHCHECK.
# checkov:skip=CKV_DOCKER_2: each role has its own Kubernetes probes; one HEALTHCHECK cannot fit five roles
ENTRYPOINT ["/app/entrypoint.sh"]
CMD ["web"]
