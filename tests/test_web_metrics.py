"""Web metrics: exact sums over a real gunicorn with two workers, served only on the metrics
listener; the public port and anything outside gunicorn answer /metrics with 404."""

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import http, make_api_token
from tests.processes import REPO_ROOT, start_web
from tests.resources import free_port

pytestmark = pytest.mark.django_db(transaction=True)


def samples(body: bytes) -> list:
    return [sample for family in text_string_to_metric_families(body.decode()) for sample in family.samples]


def total(found: list, metric: str, **labels) -> float:
    return sum(s.value for s in found if s.name == metric and labels.items() <= s.labels.items())


class Gunicorn:
    """gunicorn as the image runs it (-c python:project.gunicorn_conf), two workers."""

    def __init__(self, tmp_path, log_dir, **env):
        self.tmp_path, self.log_dir, self.extra_env = tmp_path, log_dir, env
        self.port, self.metrics_port = free_port(), free_port()
        self.multiproc_base = tmp_path / "multiproc"
        self.service = None

    def start(self) -> "Gunicorn":
        self.service = start_web(
            log_dir=self.log_dir,
            workdir=self.tmp_path,
            port=self.port,
            metrics_port=self.metrics_port,
            concurrency=2,
            PROMETHEUS_MULTIPROC_BASE_DIR=self.multiproc_base,
            **self.extra_env,
        )
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def public(self, path: str, token: str | None = None):
        return http(
            "GET", f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {token}"} if token else {}
        )

    def metrics(self) -> list:
        status, body = http("GET", f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200, body[:500]
        return samples(body)


@pytest.fixture
def gunicorn(tmp_path, service_log_dir):
    server = Gunicorn(tmp_path, service_log_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def recycling_gunicorn(tmp_path, service_log_dir):
    """Each worker replaced after 40 requests: the counts of the replaced ones must stay."""
    server = Gunicorn(tmp_path, service_log_dir, GUNICORN_MAX_REQUESTS=40, GUNICORN_MAX_REQUESTS_JITTER=0)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_request_counts_are_exact_over_workers_and_their_replacements(recycling_gunicorn):
    gunicorn = recycling_gunicorn
    token = make_api_token("read")
    paths = (
        ["/api/health/live"] * 120  # 200
        + [f"/api/task-status/{uuid.uuid4()}/" for _ in range(50)]  # 404 after database lookups
        + ["/no-such-page/"] * 30  # 404 from the URL resolver
    )
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = [status for status, _ in pool.map(lambda path: gunicorn.public(path, token), paths)]
    assert sorted(statuses) == [200] * 120 + [404] * 80

    found = gunicorn.metrics()

    assert total(found, "django_http_requests_total_by_method_total") == 200
    assert total(found, "django_http_requests_total_by_method_total", method="GET") == 200
    assert total(found, "django_http_responses_total_by_status_total", status="200") == 120
    assert total(found, "django_http_responses_total_by_status_total", status="404") == 80
    assert total(found, "django_http_responses_total_by_status_total") == 200
    assert total(found, "django_http_requests_latency_seconds_by_view_method_count") == 200
    # The database wrapper counts the task-status lookups.
    assert total(found, "django_db_execute_total", vendor="postgresql") >= 50
    # Both workers and their replacements served, each counting into its own file.
    assert len(list((gunicorn.multiproc_base / "web").glob("counter_*.db"))) >= 4
    # Scrapes are not requests: a second scrape shows the same count.
    assert total(gunicorn.metrics(), "django_http_requests_total_by_method_total") == 200


@pytest.mark.integration
def test_tasks_published_by_the_api_are_counted_over_both_workers(gunicorn, api_token):
    def publish(_):
        body = json.dumps({"x": 2, "y": 3}).encode()
        headers = {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"}
        return http("POST", f"http://127.0.0.1:{gunicorn.port}/api/simple-task/", body, headers)[0]

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(publish, range(12))) == [202] * 12

    found = gunicorn.metrics()
    assert total(found, "celery_task_sent_total", name="app.tasks.add", queue_name="default") == 12
    assert total(found, "django_http_responses_total_by_status_total", status="202") == 12


@pytest.mark.integration
def test_metrics_only_on_the_metrics_listener(gunicorn):
    status, _ = gunicorn.public("/metrics")
    assert status == 404
    status, _ = gunicorn.public("/metrics/")
    assert status == 404
    # The metrics listener serves nothing else, whatever the Host header says.
    status, _ = http("GET", f"http://127.0.0.1:{gunicorn.metrics_port}/api/health/live")
    assert status == 404
    status, body = http("GET", f"http://127.0.0.1:{gunicorn.metrics_port}/metrics", headers={"Host": "10.1.2.3:9808"})
    assert status == 200
    assert b"django_http_requests_total_by_method_total" in body


@pytest.mark.integration
def test_a_restart_starts_counting_from_zero(gunicorn):
    for _ in range(5):
        assert gunicorn.public("/api/health/live")[0] == 200
    assert total(gunicorn.metrics(), "django_http_requests_total_by_method_total") == 5

    gunicorn.stop()
    gunicorn.start()

    assert total(gunicorn.metrics(), "django_http_requests_total_by_method_total") == 0
    for _ in range(3):
        assert gunicorn.public("/api/health/live")[0] == 200
    assert total(gunicorn.metrics(), "django_http_requests_total_by_method_total") == 3


# --- Outside gunicorn: the Django test client has no gunicorn socket -----------------------


class FakeSocket:
    def __init__(self, local):
        self.local = local

    def getsockname(self):
        return self.local


def test_metrics_is_not_served_without_a_gunicorn_socket(client):
    assert client.get("/metrics").status_code == 404


def test_metrics_is_served_to_a_connection_on_the_metrics_port(client, settings):
    settings.WEB_METRICS_PORT = 9808
    client.get("/api/health/live")

    response = client.get("/metrics", **{"gunicorn.socket": FakeSocket(("0.0.0.0", 9808))})

    assert response.status_code == 200
    assert total(samples(response.content), "django_http_requests_total_by_method_total", method="GET") >= 1


def test_metrics_is_not_served_to_a_connection_on_another_port(client, settings):
    settings.WEB_METRICS_PORT = 9808

    assert client.get("/metrics", **{"gunicorn.socket": FakeSocket(("0.0.0.0", 8000))}).status_code == 404
    assert client.get("/metrics", **{"gunicorn.socket": FakeSocket("/run/gunicorn.sock")}).status_code == 404


def test_metrics_port_zero_serves_no_metrics(client, settings):
    settings.WEB_METRICS_PORT = 0

    assert client.get("/metrics", **{"gunicorn.socket": FakeSocket(("0.0.0.0", 0))}).status_code == 404


# --- The listeners gunicorn binds (project/gunicorn_conf.py) -------------------------------


def gunicorn_conf(**env):
    code = "import json, project.gunicorn_conf as c; print(json.dumps(c.bind))"
    clean = {k: v for k, v in os.environ.items() if k not in ("PORT", "WEB_METRICS_PORT")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env={**clean, **env}, capture_output=True, text=True
    )


@pytest.mark.subprocess
def test_gunicorn_binds_the_public_and_the_metrics_port():
    assert json.loads(gunicorn_conf().stdout) == ["0.0.0.0:8000", "0.0.0.0:9808"]
    assert json.loads(gunicorn_conf(PORT="8080", WEB_METRICS_PORT="9100").stdout) == ["0.0.0.0:8080", "0.0.0.0:9100"]


@pytest.mark.subprocess
def test_metrics_port_zero_binds_no_metrics_listener():
    assert json.loads(gunicorn_conf(WEB_METRICS_PORT="0").stdout) == ["0.0.0.0:8000"]


@pytest.mark.subprocess
def test_metrics_port_equal_to_the_public_port_is_refused():
    result = gunicorn_conf(PORT="8000", WEB_METRICS_PORT="8000")

    assert result.returncode != 0
    assert "WEB_METRICS_PORT must differ from PORT" in result.stderr
