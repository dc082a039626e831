"""Flower for this project: the project's Celery settings without Django's app registry, every
page behind Flower's authentication (/metrics too), a Content-Security-Policy on every response,
Prometheus' /metrics alone on a port of its own, and the workers first inspected once one is online.

Flower talks only to the broker: task events, inspect and control. The project's own app loads
every Django app and model in each process it runs in (Celery's Django fixup); measured, that was
a third of Flower's memory. Results are read with Celery's plain Redis backend (the same keys);
with RESULT_BACKEND_URL=django-db Flower shows none.

    python -m project.flower_app [FLOWER OPTIONS...]    (the image's flower role)

Every option of `celery flower` works, as a flag or a FLOWER_* variable; FLOWER_METRICS_PORT (0:
none) is this module's own.
"""

import atexit
import logging
import os
import signal
import sys
from functools import cached_property

import prometheus_client
import tornado.ioloop
import tornado.web
from celery import Celery
from django.conf import settings
from flower.app import Flower
from flower.views import monitor

from project import environment, tls

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project", fixups=[], set_as_current=True)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.result_backend = settings.RESULT_BACKEND_URL if settings.RESULT_BACKEND_URL != "django-db" else None

logger = logging.getLogger(__name__)

# Flower's pages use its own static files only. Its one inline script (workers.html: `var
# autorefresh = 0|1;`) is allowed by the hashes of its two renderings, and worker.html's one style
# attribute by its hash; tests/test_flower.py fails when a Flower upgrade changes either.
INLINE_SCRIPT_HASHES = (
    "'sha256-A0YIP5A+DKoseGAUTHRoMPDkKPK5cKzfYH3mjcCKtj8='",  # var autorefresh = 1;
    "'sha256-Plc72SJ5jJr8U3f1AUIRpRT60gipUj+EwCvnh1JkE68='",  # var autorefresh = 0;
)
INLINE_STYLE_HASHES = ("'sha256-D2nNQPC8bNaTHWXXLapeP7bIwq/UgHVuxninLxvSi0Y='",)  # width: 125px;
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        f"script-src 'self' {' '.join(INLINE_SCRIPT_HASHES)}",
        f"style-src 'self' 'unsafe-hashes' {' '.join(INLINE_STYLE_HASHES)}",
        # Bootstrap draws its icons as data: SVG images.
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ]
)


class ContentSecurityPolicy(tornado.web.OutputTransform):
    """Adds the policy to every response of the Tornado application (pages, static files, errors)."""

    def transform_first_chunk(self, status_code, headers, chunk, finishing):
        headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "same-origin")
        return status_code, headers, chunk


class AuthenticatedMetrics(monitor.Metrics):
    """Flower's /metrics, which answers anyone (it skips @authenticated), behind the login its pages have."""

    @tornado.web.authenticated
    async def get(self):
        await super().get()


class MetricsListener(tornado.web.RequestHandler):
    """/metrics on FLOWER_METRICS_PORT, for Prometheus: a port the ingress never routes to."""

    def initialize(self, flower: Flower) -> None:
        self.flower = flower

    def get(self) -> None:
        self.flower.purge_offline_worker_metrics()
        self.set_header("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)
        self.write(prometheus_client.generate_latest())


class ProjectFlower(Flower):
    def __init__(self, *args, metrics_port: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics_port = metrics_port
        self.add_transform(ContentSecurityPolicy)
        for rule in self.wildcard_router.rules:
            if rule.target is monitor.Metrics:
                rule.target = AuthenticatedMetrics

    @cached_property
    def broker_uri_with_password(self):
        """The broker URL as given, for Flower's broker page (queue lengths): kombu would name the
        project's Redis transport (app/redis_transport.py) by its class path, a scheme the page
        does not know ("'redis' broker is not supported"). Its TLS options: broker_use_ssl."""
        return settings.CELERY_BROKER_URL

    def start(self):
        """Flower's start, with its first inspection of the workers (their stats, queues, registered
        tasks, configuration) held until a worker is online. Flower inspects as it starts; started
        beside the workers (make run, a rollout) it asked before any could answer, and logged each
        unanswered method as failed ("Inspect method stats failed"). A broker error still shows:
        in the inspection, and in Flower's events and enable-events loops before it."""
        self.events.start()
        self.started = True
        self.first_inspection = tornado.ioloop.PeriodicCallback(self.inspect_once_a_worker_is_online, 1000)
        self.first_inspection.start()
        self.io_loop.start()

    def inspect_once_a_worker_is_online(self) -> None:
        # A worker is online from its first event: worker-online, or a heartbeat (every 2 s) from
        # one already running when Flower starts.
        if any(worker.alive for worker in self.events.state.workers.values()):
            self.first_inspection.stop()
            self.update_workers()

    def start_http_server(self):
        port = super().start_http_server()
        if self.metrics_port:
            metrics = tornado.web.Application([(r"/metrics", MetricsListener, {"flower": self})])
            metrics.listen(self.metrics_port, address=self.options.address)
            logger.info("Flower metrics on port %s", self.metrics_port)
        return port


def main(argv: list[str]) -> None:
    """What `celery -A project.flower_app flower` does (flower.command.flower), with ProjectFlower."""
    from flower import command

    command.apply_env_options()
    command.apply_options("flower", argv)
    command.extract_settings()
    command.setup_logging()

    # A TLS server whose certificate is not trusted ends Flower here (project/tls.py).
    tls.check_servers(settings.TLS_CLIENTS)
    metrics_port = environment.read("FLOWER_METRICS_PORT")
    flower = ProjectFlower(capp=app, options=command.options, metrics_port=metrics_port, **command.settings)
    atexit.register(flower.stop)
    signal.signal(signal.SIGTERM, command.sigterm_handler)
    port = flower.start_http_server()
    command.print_banner(app, "ssl_options" in command.settings, port)
    try:
        flower.start()
    except (KeyboardInterrupt, SystemExit):
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
