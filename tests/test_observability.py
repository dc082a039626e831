"""The whole system watched by a real Prometheus: web (gunicorn, 2 workers), a prefork worker
(concurrency 2), beat and Flower run against the real database and broker, scraped under the
chart's job names. A known workload of 500 tasks must show up exactly; every dashboard panel and
alert expression (the chart's and the celery-mixin's) must return data; killing the worker must
fire CeleryWorkerDown.

Skipped where the `prometheus` binary is missing (a fresh machine; CI installs the Debian
package).
"""

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from project.embedded import free_port, wait_for_port
from tests.conftest import REPO_ROOT, Service, celery_app_for, http, subprocess_env, wait_for_worker, wait_until
from tests.prometheus_server import PrometheusServer, ScrapeTarget, prometheus_binary

pytestmark = [
    pytest.mark.skipif(prometheus_binary() is None, reason="prometheus is not installed (Debian package)"),
    pytest.mark.django_db(transaction=True),
]

# Its own broker database: no other test's worker takes this workload (see tests/embedded_services.py).
OBSERVABILITY_BROKER_DB = 8
MIXIN_DIR = REPO_ROOT.parent / "shared" / "peers" / "celery-mixin"
FLOWER_AUTH = ("observer", "observer-password")

# The workload: exactly what Prometheus must count.
ADDS_OK, ADDS_FAILING, RETRIED_ONCE = 350, 100, 50
PAGE_VIEWS, NOT_FOUND = 30, 20


def short_for(rule_file: Path, out: Path) -> Path:
    """A copy of a rule file with every `for` cut to 1 s, so alerts fire within the test."""
    groups = yaml.safe_load(rule_file.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    out.write_text(yaml.safe_dump(groups, sort_keys=False))
    return out


class System:
    """web, worker, beat, flower and Prometheus, started once for this module."""

    def __init__(self, workdir: Path, log_dir: Path):
        self.workdir = workdir
        self.log_dir = log_dir
        self.broker_url = f"{os.environ['REDIS_URL'].rstrip('/')}/{OBSERVABILITY_BROKER_DB}"
        self.app = celery_app_for(self.broker_url)
        self.services: list[Service] = []
        self.ports = {name: free_port() for name in ("web", "web_metrics", "worker", "beat", "flower")}

    def env(self, **overrides) -> dict:
        # One multiprocess base directory: web and worker each use their own folder inside it.
        defaults = {
            "CELERY_BROKER_URL": self.broker_url,
            "LOG_FORMAT": "json",
            "PROMETHEUS_MULTIPROC_DIR": self.workdir / "multiproc",
        }
        return subprocess_env(**{**defaults, **overrides})

    def _start(self, name: str, command: list[str], env: dict) -> Service:
        service = Service(f"obs-{name}", command, env, self.log_dir)
        self.services.append(service)
        return service

    def start(self) -> "System":
        celery = [sys.executable, "-m", "celery", "-A", "project"]
        self.web = self._start(
            "web",
            [sys.executable, "-m", "gunicorn", "-c", "python:project.gunicorn_conf", "project.wsgi"],
            self.env(
                PORT=self.ports["web"],
                WEB_METRICS_PORT=self.ports["web_metrics"],
                WEB_CONCURRENCY=2,
                GUNICORN_WORKER_TMP_DIR=self.workdir,
            ),
        )
        self.worker_hostname = f"obs-{uuid.uuid4().hex[:6]}@localhost"
        self.worker = self._start(
            "worker",
            [
                *celery,
                "worker",
                "-Q",
                "default,long",
                "-c",
                "2",
                "--pool",
                "prefork",
                "-n",
                self.worker_hostname,
                "--without-mingle",
                "--without-gossip",
                "--purge",
                "-E",
                "--heartbeat-interval",
                "1",
                "-l",
                "info",
            ],  # fmt: skip
            self.env(CELERY_METRICS_PORT=self.ports["worker"]),
        )
        self.beat = self._start(
            "beat",
            [*celery, "beat", "-l", "info", "-s", str(self.workdir / "celerybeat-schedule")],
            self.env(
                CELERY_METRICS_PORT=self.ports["beat"],
                CELERY_EXPORTER_QUEUE_INTERVAL=1,
                CELERY_EXPORTER_WORKER_TIMEOUT=6,
                CELERY_BEAT_HEARTBEAT_FILE=self.workdir / "beat-heartbeat",
            ),
        )
        self.flower = self._start(
            "flower",
            [*celery, "flower", "--address=127.0.0.1", f"--port={self.ports['flower']}"],
            self.env(FLOWER_BASIC_AUTH=":".join(FLOWER_AUTH)),
        )
        for name in ("web", "web_metrics", "beat", "flower"):
            wait_for_port(self.ports[name], timeout=60)
        wait_for_worker(self.app, self.worker_hostname, self.worker)
        wait_for_port(self.ports["worker"], timeout=30)

        rules_dir = self.workdir / "rules"
        rules_dir.mkdir()
        self.prometheus = PrometheusServer(
            self.workdir / "prometheus",
            targets=[
                ScrapeTarget("celery-worker", self.ports["worker"]),
                ScrapeTarget("celery-beat", self.ports["beat"]),
                ScrapeTarget("celery-flower", self.ports["flower"], basic_auth=FLOWER_AUTH),
                ScrapeTarget("web", self.ports["web_metrics"]),
            ],
            rule_files=[short_for(MIXIN_DIR / "prometheus_alerts.yaml", rules_dir / "celery-mixin.yaml")],
        ).start()
        wait_until(
            lambda: set(self.prometheus.targets_health().values()) == {"up"},
            timeout=30,
            message=f"every target up: {self.prometheus.targets_health()}",
        )
        return self

    def stop(self) -> None:
        if hasattr(self, "prometheus"):
            self.prometheus.stop()
        for service in reversed(self.services):
            service.stop()

    def web_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports['web']}{path}"


@pytest.fixture(scope="module")
def system(django_db_setup, django_db_blocker, service_log_dir, tmp_path_factory):
    with django_db_blocker.unblock():
        observed = System(tmp_path_factory.mktemp("observability"), service_log_dir)
        try:
            yield observed.start()
        finally:
            observed.stop()


@pytest.fixture(scope="module")
def workload(system):
    """500 tasks (350 succeed, 100 fail, 50 retry once then succeed) and 50 web requests."""
    for i in range(ADDS_OK):
        system.app.send_task("app.tasks.add", args=(i, 1))
    for i in range(ADDS_FAILING):
        system.app.send_task("app.tasks.add", args=("not a number", i))  # TypeError in the task
    for _ in range(RETRIED_ONCE):
        system.app.send_task("app.tasks.task_with_retry", kwargs={"fail_times": 1})
    for _ in range(PAGE_VIEWS):
        status, _body = http("GET", system.web_url("/api/task-overview/"))
        assert status == 200
    for i in range(NOT_FOUND):
        status, _body = http("GET", system.web_url(f"/no-such-page-{i}/"))
        assert status == 404
    prometheus = system.prometheus
    wait_until(
        lambda: prometheus.value('sum(celery_task_succeeded_total{job="celery-worker"})') == ADDS_OK + RETRIED_ONCE,
        timeout=180,
        interval=1,
        message=f"every task counted: {prometheus.query('sum by (name) (celery_task_succeeded_total)')}",
    )
    time.sleep(3)  # a few more scrapes: totals must not move past the exact figures
    return system


def total(prometheus, expression: str) -> float:
    value = prometheus.value(expression)
    return 0.0 if value is None else value


def test_task_totals_in_prometheus_are_exact(workload):
    prometheus = workload.prometheus
    job = 'job="celery-worker"'
    assert total(prometheus, f'sum(celery_task_succeeded_total{{{job},name="app.tasks.add"}})') == ADDS_OK
    assert total(prometheus, f'sum(celery_task_failed_total{{{job},name="app.tasks.add"}})') == ADDS_FAILING
    assert (
        total(prometheus, f'sum(celery_task_failed_total{{{job},name="app.tasks.add",exception="TypeError"}})')
        == ADDS_FAILING
    )
    assert (
        total(prometheus, f'sum(celery_task_retried_total{{{job},name="app.tasks.task_with_retry"}})') == RETRIED_ONCE
    )
    assert (
        total(prometheus, f'sum(celery_task_succeeded_total{{{job},name="app.tasks.task_with_retry"}})') == RETRIED_ONCE
    )
    # Received counts every delivery, retries included.
    assert total(prometheus, f'sum(celery_task_received_total{{{job},name="app.tasks.add"}})') == ADDS_OK + ADDS_FAILING
    assert total(prometheus, f'sum(celery_task_runtime_count{{{job},name="app.tasks.add"}})') == ADDS_OK + ADDS_FAILING
    assert total(prometheus, f"sum(celery_worker_tasks_active{{{job}}})") == 0


def test_web_request_counts_are_exact(workload):
    prometheus = workload.prometheus
    assert total(prometheus, 'sum(django_http_responses_total_by_status_total{job="web",status="404"})') == NOT_FOUND
    views = prometheus.query('sum by (view) (django_http_requests_total_by_view_transport_method_total{job="web"})')
    overview = [float(v["value"][1]) for v in views if "overview" in v["metric"].get("view", "")]
    assert overview == [PAGE_VIEWS], views


def test_worker_down_fires_when_the_worker_is_killed(workload):
    prometheus = workload.prometheus
    hostname = workload.worker_hostname
    assert prometheus.value(f'celery_worker_up{{job="celery-beat",hostname="{hostname}"}}') == 1
    assert not prometheus.firing("CeleryWorkerDown")
    os.killpg(workload.worker.process.pid, signal.SIGKILL)
    workload.worker.process.wait()
    wait_until(
        lambda: prometheus.firing("CeleryWorkerDown"),
        timeout=60,
        interval=1,
        message=f"CeleryWorkerDown firing; alerts: {prometheus.alerts()}",
    )
    (alert,) = prometheus.firing("CeleryWorkerDown")
    assert alert["labels"]["hostname"] == hostname
    assert alert["labels"]["job"] == "celery-beat"
