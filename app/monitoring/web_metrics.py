"""/metrics of the web role, answered only on gunicorn's metrics listener (WEB_METRICS_PORT).

The ingress sends every path to the public port, so the metrics must not be reachable there:
the public port answers /metrics with 404 (no URL pattern), and this middleware, first in
MIDDLEWARE, answers every request that arrived on the metrics listener itself. It runs before
any other middleware, so Prometheus scraping a pod by IP is not refused by ALLOWED_HOSTS or
redirected by SECURE_SSL_REDIRECT, and scrapes do not count as requests.

Which listener accepted a request is read from the connection itself (gunicorn puts it in
``environ["gunicorn.socket"]``). SERVER_PORT is no proof: for a unix socket gunicorn takes it
from the client's Host header. Outside gunicorn (runserver, the test client, another WSGI
server) there is no such socket, so nothing is ever served as metrics there: fail closed.

Gunicorn workers count in prometheus-client multiprocess mode (project/gunicorn_conf.py sets
PROMETHEUS_MULTIPROC_DIR before they start), so the page is the sum over all workers.
"""

import os

from django.conf import settings
from django.http import HttpResponse, HttpResponseNotFound

METRICS_PATH = "/metrics"


def arrived_on_metrics_listener(environ: dict) -> bool:
    port = settings.WEB_METRICS_PORT
    sock = environ.get("gunicorn.socket")
    if not port or sock is None:
        return False
    try:
        local = sock.getsockname()
    except OSError:
        return False
    # (host, port) for IPv4, (host, port, flow, scope) for IPv6, a path for a unix socket.
    return isinstance(local, tuple) and local[1] == port


def metrics_page() -> HttpResponse:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class MetricsListenerMiddleware:
    """On the metrics listener: /metrics, and 404 for anything else. Elsewhere: pass through."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not arrived_on_metrics_listener(request.META):
            return self.get_response(request)
        if request.path_info.rstrip("/") == METRICS_PATH:
            return metrics_page()
        return HttpResponseNotFound("Only /metrics is served on this port.\n", content_type="text/plain")
