"""The whole system watched by a real Prometheus: web (gunicorn, 2 workers), a prefork worker
(concurrency 2), beat and Flower run against the real database and broker, scraped under the
chart's job names. A known workload of 500 tasks must show up exactly; every dashboard panel and
alert expression (the chart's and the celery-mixin's) must return data; killing the worker must
fire CeleryWorkerDown.

Skipped where the `prometheus` binary is missing (a fresh machine; CI installs the Debian
package).
"""

import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from project.embedded import EmbeddedRedis, wait_for_port
from tests.conftest import celery_app_for, http, make_api_token, wait_until
from tests.deploy.monitoring_queries import MIXIN_DIR, all_queries, chart_rule_groups
from tests.processes import (
    Service,
    beat_command,
    new_hostname,
    subprocess_env,
    wait_for_worker,
    web_command,
    worker_command,
)
from tests.prometheus_server import PrometheusServer, ScrapeTarget, prometheus_binary
from tests.resources import empty_redis_db, free_port

# In a parallel run this module stays in one process: the system under watch is started once for the module.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("observability"),
    pytest.mark.skipif(prometheus_binary() is None, reason="prometheus is not installed (Debian package)"),
    pytest.mark.django_db(transaction=True),
]

FLOWER_AUTH = ("observer", "observer-password")

# The workload: exactly what Prometheus must count.
ADDS_OK, ADDS_FAILING, RETRIED_ONCE = 350, 100, 50
REVOKED, UNKNOWN_TASKS = 5, 5
PAGE_VIEWS, NOT_FOUND = 30, 20
WORKLOAD_TASKS = 'job="celery",name=~"app.tasks.add|app.tasks.task_with_retry"'
# Once the cache is stopped: server errors from the web, failing canaries on the worker.
HEALTH_503, FAILING_CANARIES = 10, 4


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

    def __init__(self, workdir: Path, log_dir: Path, broker_url: str):
        self.workdir = workdir
        self.log_dir = log_dir
        self.broker_url = broker_url
        self.app = celery_app_for(self.broker_url)
        self.services: list[Service] = []
        self.ports = {
            name: free_port() for name in ("web", "web_metrics", "worker", "beat", "flower", "flower_metrics")
        }
        # A cache of the system's own, stopped half-way to make health checks fail.
        self.cache = EmbeddedRedis(workdir=workdir)

    def env(self, **overrides) -> dict:
        # One multiprocess base directory: web and worker each use their own folder inside it.
        defaults = {
            "CELERY_BROKER_URL": self.broker_url,
            "CACHE_URL": f"{self.cache.url}/0",
            "LOG_FORMAT": "json",
            "PROMETHEUS_MULTIPROC_BASE_DIR": self.workdir / "multiproc",
        }
        return subprocess_env(**{**defaults, **overrides})

    def _start(self, name: str, command: list[str], env: dict) -> Service:
        service = Service(f"obs-{name}", command, env, self.log_dir)
        self.services.append(service)
        return service

    def start(self) -> "System":
        self.cache.start()
        # Something for beat to send, every second (not a task whose totals are asserted).
        every_second, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
        PeriodicTask.objects.update_or_create(
            name="observability: multiply",
            defaults={"task": "app.tasks.multiply", "args": "[2, 3]", "interval": every_second},
        )
        self.web = self._start(
            "web",
            web_command(),
            self.env(
                PORT=self.ports["web"],
                WEB_METRICS_PORT=self.ports["web_metrics"],
                WEB_CONCURRENCY=2,
                GUNICORN_WORKER_TMP_DIR=self.workdir,
            ),
        )
        self.worker_hostname = new_hostname("obs")
        self.worker = self._start(
            "worker",
            worker_command(hostname=self.worker_hostname, options=("--heartbeat-interval", "1")),
            self.env(CELERY_METRICS_PORT=self.ports["worker"]),
        )
        self.beat = self._start(
            "beat",
            beat_command(self.workdir / "celerybeat-schedule"),
            self.env(
                CELERY_METRICS_PORT=self.ports["beat"],
                CELERY_EXPORTER_QUEUE_INTERVAL=1,
                CELERY_EXPORTER_WORKER_TIMEOUT=6,
                CELERY_BEAT_HEARTBEAT_FILE=self.workdir / "beat-heartbeat",
            ),
        )
        # As the image runs it: its pages behind basic auth, /metrics alone on a port of its own.
        self.flower = self._start(
            "flower",
            [sys.executable, "-m", "project.flower_app", "--address=127.0.0.1", f"--port={self.ports['flower']}"],
            self.env(FLOWER_BASIC_AUTH=":".join(FLOWER_AUTH), FLOWER_METRICS_PORT=self.ports["flower_metrics"]),
        )
        for name in ("web", "web_metrics", "beat", "flower", "flower_metrics"):
            wait_for_port(self.ports[name], timeout=60)
        wait_for_worker(self.app, self.worker_hostname, self.worker)
        wait_for_port(self.ports["worker"], timeout=30)

        rules_dir = self.workdir / "rules"
        rules_dir.mkdir()
        self.prometheus = PrometheusServer(
            self.workdir / "prometheus",
            targets=[
                ScrapeTarget("celery", self.ports["worker"]),
                ScrapeTarget("celery-exporter", self.ports["beat"]),
                # The chart's PodMonitor: Flower's metrics port, no credentials.
                ScrapeTarget("celery-flower", self.ports["flower_metrics"]),
                ScrapeTarget("web", self.ports["web_metrics"]),
            ],
            rule_files=[
                short_for(MIXIN_DIR / "prometheus_alerts.yaml", rules_dir / "celery-mixin.yaml"),
                short_for(self.chart_rules(rules_dir / "chart-rules.yaml"), rules_dir / "chart-rules.yaml"),
            ],
        ).start()
        wait_until(
            lambda: set(self.prometheus.targets_health().values()) == {"up"},
            timeout=30,
            message=f"every target up: {self.prometheus.targets_health()}",
        )
        return self

    @staticmethod
    def chart_rules(path: Path) -> Path:
        path.write_text(yaml.safe_dump(chart_rule_groups(), sort_keys=False))
        return path

    def stop(self) -> None:
        if hasattr(self, "prometheus"):
            self.prometheus.stop()
        for service in reversed(self.services):
            service.stop()
        self.cache.stop()

    def web_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports['web']}{path}"


@pytest.fixture(scope="module")
def system(django_db_setup, django_db_blocker, service_log_dir, tmp_path_factory):
    with django_db_blocker.unblock(), empty_redis_db() as broker_url:
        observed = System(tmp_path_factory.mktemp("observability"), service_log_dir, broker_url)
        try:
            yield observed.start()
        finally:
            observed.stop()


@pytest.fixture(scope="module")
def workload(system, django_db_blocker):
    """500 tasks (350 succeed, 100 fail, 50 retry once then succeed), a canary on each queue,
    and 50 web requests."""
    with django_db_blocker.unblock():
        read_token = make_api_token("read")
    for i in range(ADDS_OK):
        system.app.send_task("app.tasks.add", args=(i, 1))
    for i in range(ADDS_FAILING):
        system.app.send_task("app.tasks.add", args=("not a number", i))  # TypeError in the task
    for _ in range(RETRIED_ONCE):
        system.app.send_task("app.tasks.task_with_retry", kwargs={"fail_times": 1})
    for queue in ("default", "long"):
        system.app.send_task("app.tasks.health_check", queue=queue)
    revoked_ids = [str(uuid.uuid4()) for _ in range(REVOKED)]
    system.app.control.revoke(revoked_ids)  # revoked before they are sent: dropped on receipt
    time.sleep(1)
    for task_id in revoked_ids:
        system.app.send_task("app.tasks.add", args=(1, 1), task_id=task_id)
    for _ in range(UNKNOWN_TASKS):
        system.app.send_task("app.tasks.no_such_task", queue="default")  # rejected by the worker
    for _ in range(PAGE_VIEWS):
        status, _body = http(
            "GET", system.web_url("/api/task-overview/"), headers={"Authorization": f"Bearer {read_token}"}
        )
        assert status == 200
    for i in range(NOT_FOUND):
        status, _body = http("GET", system.web_url(f"/no-such-page-{i}/"))
        assert status == 404
    prometheus = system.prometheus
    wait_until(
        lambda: (
            total(prometheus, f"sum(celery_task_succeeded_total{{{WORKLOAD_TASKS}}})") == ADDS_OK + RETRIED_ONCE
            and total(prometheus, 'sum(celery_task_rejected_total{name="unknown"})') == UNKNOWN_TASKS
        ),
        timeout=180,
        interval=1,
        message="every succeeded task of the workload counted",
    )
    time.sleep(3)  # a few more scrapes: totals must not move past the exact figures
    return system


@pytest.fixture(scope="module")
def degraded(workload):
    """The cache stops: the web's health endpoint answers 503, the worker's canaries fail."""
    workload.cache.stop()
    for _ in range(HEALTH_503):
        status, _body = http("GET", workload.web_url("/api/health/"))
        assert status == 503
    for _ in range(FAILING_CANARIES):
        # Apart, as beat sends them: increase() sees a new series' steps after its first sample.
        workload.app.send_task("app.tasks.health_check", queue="default")
        time.sleep(1.5)
    prometheus = workload.prometheus
    wait_until(
        lambda: total(prometheus, 'sum(celery_task_failed_total{name="app.tasks.health_check"})') == FAILING_CANARIES,
        timeout=60,
        interval=1,
        message="the failing canaries counted",
    )
    return workload


def total(prometheus, expression: str) -> float:
    value = prometheus.value(expression)
    return 0.0 if value is None else value


def test_task_totals_in_prometheus_are_exact(workload):
    prometheus = workload.prometheus
    job = 'job="celery"'
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
    assert total(prometheus, f'sum(celery_task_revoked_total{{{job},name="app.tasks.add"}})') == REVOKED
    assert total(prometheus, f'sum(celery_task_rejected_total{{{job},name="unknown"}})') == UNKNOWN_TASKS
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


def test_web_server_errors_are_counted(degraded):
    assert (
        total(degraded.prometheus, 'sum(django_http_responses_total_by_status_total{job="web",status="503"})')
        == HEALTH_503
    )


_SET_OPERATOR = re.compile(r"^\s*(?:and|or|unless)\s*$", re.MULTILINE)
_THRESHOLD = re.compile(r"\s*(?:>=|<=|==|!=|>|<)\s*-?[\d.]+\s*$")
_ABSENT = re.compile(r"^absent\((.*)\)$", re.DOTALL)


def signals_of(expression: str) -> list[str]:
    """What an alert watches: each side of a top-level and/or/unless without its threshold, and
    the series inside absent(). Those must return data while the system runs; the alert itself
    returns data only while it fires."""
    parts = []
    for part in _SET_OPERATOR.split(expression):
        part = _THRESHOLD.sub("", part.strip())
        absent = _ABSENT.match(part)
        parts.append(absent.group(1) if absent else part)
    return parts


def test_signals_of_alert_expressions():
    assert signals_of('celery_worker_up{job="x"} == 0') == ['celery_worker_up{job="x"}']
    assert signals_of("a > 100\nand\nderiv(a[5m]) > 0") == ["a", "deriv(a[5m])"]
    assert signals_of('time() - max(t) > 120\nor\nabsent(t{job="b"})') == ["time() - max(t)", 't{job="b"}']


# Alerts whose signal exists only on a RabbitMQ broker (this system runs on Redis): the dead-letter
# queues' lengths. Beat's series for them is tested on RabbitMQ (tests/test_cluster_metrics.py),
# the alert's firing by promtool (tests/deploy/promtool/).
RABBITMQ_ONLY_ALERTS = {"CeleryTasksDeadLettered"}


def test_every_dashboard_panel_and_alert_returns_data(degraded):
    prometheus = degraded.prometheus
    time.sleep(5)  # rate() over the workload needs a few scrapes after it
    empty = []
    for source, expression in all_queries():
        if any(source.endswith(f" alert: {name}") for name in RABBITMQ_ONLY_ALERTS):
            continue
        expressions = signals_of(expression) if " alert: " in source else [expression]
        for query in expressions:
            if not prometheus.query(query):
                empty.append(f"{source}: {query}")
    assert not empty, "no data for:\n" + "\n".join(empty)


def wait_for_alerts(prometheus, name: str, count: int = 1) -> list[dict]:
    """The firing alerts `name` once `count` of them fire (rules' `for` cut to 1 s here)."""
    wait_until(lambda: len(prometheus.firing(name)) >= count, timeout=60, interval=1, message=f"{count} {name} firing")
    return prometheus.firing(name)


def test_canary_alert_fires_when_health_checks_fail(degraded):
    prometheus = degraded.prometheus
    assert prometheus.value('max(django_celery_k8s_health_check_last_success_timestamp_seconds{queue_name="long"})')
    (alert,) = wait_for_alerts(prometheus, "CeleryHealthCheckCanaryFailing")
    assert alert["labels"]["queue_name"] == "default"


def test_worker_down_fires_when_the_worker_is_killed(workload):
    prometheus = workload.prometheus
    hostname = workload.worker_hostname
    assert prometheus.value(f'celery_worker_up{{job="celery-exporter",hostname="{hostname}"}}') == 1
    assert not prometheus.firing("CeleryWorkerDown")
    os.killpg(workload.worker.process.pid, signal.SIGKILL)
    workload.worker.process.wait()
    # The celery-mixin's rule and the chart's (which links its runbook) both fire, for this worker.
    alerts = wait_for_alerts(prometheus, "CeleryWorkerDown", count=2)
    assert sorted("runbook_url" in alert["annotations"] for alert in alerts) == [False, True]
    for alert in alerts:
        assert alert["labels"]["hostname"] == hostname
        assert alert["labels"]["job"] == "celery-exporter"
