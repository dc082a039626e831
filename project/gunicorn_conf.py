"""gunicorn settings for the web role, each from an environment variable declared (with its
default) in project/environment.py.

Used as `gunicorn -c python:project.gunicorn_conf project.wsgi` (see deploy/image/entrypoint.sh).
https://docs.gunicorn.org/en/stable/settings.html
"""

import gc
import ipaddress
import os
from pathlib import Path

from project import environment, logging_config, tls, tracing

port = environment.read("PORT")
# A second listener serving only /metrics (app/monitoring/web_metrics.py): the ingress sends every path to
# the public port, which answers /metrics with 404. 0: no metrics listener.
metrics_port = environment.read("WEB_METRICS_PORT")
if metrics_port == port:
    raise SystemExit(f"WEB_METRICS_PORT must differ from PORT ({port}); 0 turns the metrics listener off.")
bind = [f"0.0.0.0:{port}"] + ([f"0.0.0.0:{metrics_port}"] if metrics_port else [])
workers = environment.read("WEB_CONCURRENCY")
threads = environment.read("GUNICORN_THREADS")
timeout = environment.read("GUNICORN_TIMEOUT")
# On SIGTERM, requests in flight get this long to finish before workers are killed.
graceful_timeout = environment.read("GUNICORN_GRACEFUL_TIMEOUT")
keepalive = environment.read("GUNICORN_KEEPALIVE")
# Recycle workers now and then (jittered, so they do not all restart together).
max_requests = environment.read("GUNICORN_MAX_REQUESTS")
max_requests_jitter = environment.read("GUNICORN_MAX_REQUESTS_JITTER")
# The heartbeat file of each worker: in memory, and writable with a read-only root filesystem.
worker_tmp_dir = environment.read("GUNICORN_WORKER_TMP_DIR")
# gunicorn 25+ creates a control socket under $HOME by default; nothing uses it here.
control_socket_disable = True
# The proxies (addresses or CIDR networks; * for any) trusted with X-Forwarded-* headers: the
# chart's ingress controller. gunicorn takes the scheme from them only; pre_request below drops
# those headers from every other peer before Django sees them.
forwarded_allow_ips = environment.read("FORWARDED_ALLOW_IPS")
loglevel = environment.read("GUNICORN_LOG_LEVEL")
# gunicorn's error and access logs go through the project's logging configuration
# (project/logging_config.py), as Django's and Celery's do: one JSON object per line, or
# readable text with LOG_FORMAT=console. The access line's fields come from gunicorn's atoms.
logconfig_dict = logging_config.build(
    log_format=logging_config.log_format_from_environment(),
    level=environment.read("DJANGO_LOG_LEVEL"),
)
# The event of each access line; its fields (method, path, status, duration_ms, request_id...)
# are added by logging_config.gunicorn_access_fields.
access_log_format = "%(m)s %(U)s %(s)s"


# --- Web metrics: prometheus-client multiprocess mode across the workers ----------------------
# https://prometheus.github.io/client_python/multiprocess/
# prometheus-client chooses its value class from PROMETHEUS_MULTIPROC_DIR when it is imported,
# and with preload_app the master imports Django (and prometheus-client) right after reading
# this file: so the web's own empty directory under the base is made here (a Celery worker uses
# <base>/worker).


def _web_metrics_dir() -> Path:
    path = Path(environment.read("PROMETHEUS_MULTIPROC_BASE_DIR")) / "web"
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # counts of an earlier run; only prometheus-client's files
        stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


WEB_METRICS_DIR = _web_metrics_dir()

# The app is imported once, in the master, and the workers forked from it share those pages:
# measured, a third less memory for the web role (README), and a recycled worker
# (max_requests) starts without importing anything.
preload_app = True


def on_starting(server):
    """Master, with the app loaded: a TLS server whose certificate is not trusted ends web here
    (project/tls.py), not in every readiness check."""
    from django.conf import settings

    server.log.info("Web metrics: multiprocess directory %s", WEB_METRICS_DIR)
    tls.check_servers(settings.TLS_CLIENTS)


# Django reads X-Forwarded-Proto (SECURE_PROXY_SSL_HEADER) and django-axes X-Forwarded-For (the
# client address a login lock-out counts) from request headers, whoever sent them: a client that
# reaches gunicorn directly could claim https or someone else's address.
FORWARDED_HEADERS = frozenset(
    {"X-FORWARDED-FOR", "X-FORWARDED-PROTO", "X-FORWARDED-HOST", "X-FORWARDED-PORT", "FORWARDED"}
)


def is_trusted_proxy(peer, allowed: list[str]) -> bool:
    """Whether the peer (gunicorn's (host, port), or a UNIX socket's name) is in FORWARDED_ALLOW_IPS."""
    if not isinstance(peer, tuple) or "*" in allowed:
        return True  # a UNIX socket: only the local proxy can connect (gunicorn's own rule)
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(network, strict=False) for network in allowed)


def pre_request(worker, req):
    """Worker, before each request: X-Forwarded-* headers count only from a trusted proxy."""
    if not is_trusted_proxy(req.peer_addr, worker.cfg.forwarded_allow_ips):
        req.headers = [(name, value) for name, value in req.headers if name not in FORWARDED_HEADERS]


def pre_fork(server, worker):
    """Master, before each worker is forked: the preloaded app's objects move to a permanent
    generation, so the workers' garbage collections never write to (and so copy) those pages."""
    gc.freeze()


def post_fork(server, worker):
    """Worker: if something imported prometheus-client before this file set its directory, the
    worker inherited the single-process value class; switch it, as prometheus-client would have.
    With tracing on, the worker starts its own exporter (its thread would not survive the fork)."""
    from prometheus_client import values

    if tracing.enabled():
        tracing.start_exporting("web")

    if not getattr(values.ValueClass, "_multiprocess", False):
        server.log.warning("prometheus-client was imported too early; switching it to multiprocess mode")
        values.ValueClass = values.MultiProcessValue()


def child_exit(server, worker):
    """Master: a worker exited; drop its live gauges (its counters and histograms stay summed)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
