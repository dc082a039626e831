"""Sentry from real processes: a worker with SENTRY_DSN reports a failing task to a local HTTP
server standing in for Sentry; without a DSN the SDK is not started at all."""

import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import project
from tests.conftest import celery_app_for, wait_until
from tests.processes import REPO_ROOT, require_process_marker, start_worker
from tests.resources import free_port


class SentrySink:
    """Records the envelopes POSTed to /api/<project>/envelope/ (gzip or plain), item by item."""

    def __init__(self):
        require_process_marker("a Sentry stand-in")
        self.items: list[tuple[dict, dict]] = []  # (item header, payload)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path.endswith("/envelope/"):
                    lines = body.decode().splitlines()
                    # Line 0: the envelope header; then an item header and its payload, in pairs.
                    for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                        sink.items.append((json.loads(header), json.loads(payload)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.port}/1"

    def events(self) -> list[dict]:
        return [payload for header, payload in self.items if header.get("type") == "event"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def events_of(sink: SentrySink, task_id: str) -> list[dict]:
    return [event for event in sink.events() if event.get("tags", {}).get("celery_task_id") == task_id]


@pytest.fixture
def sentry_sink():
    sink = SentrySink()
    yield sink
    sink.close()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_failing_task_sends_an_event_with_its_name_and_exception(sentry_sink, redis_url, service_log_dir, tmp_path):
    app = celery_app_for(redis_url)
    worker = start_worker(
        app,
        broker_url=redis_url,
        log_dir=service_log_dir,
        name="sentry",
        queues="default",
        concurrency=1,
        SENTRY_DSN=sentry_sink.dsn,
        SENTRY_ENVIRONMENT="test-sink",
        PROMETHEUS_MULTIPROC_BASE_DIR=tmp_path / "metrics",
    )
    try:
        # add(1, "one"): a TypeError inside the task, raised in the pool process.
        result = app.send_task("app.tasks.add", args=[1, "one"])

        event = wait_until(
            lambda: next(iter(events_of(sentry_sink, result.id)), None), timeout=30, message="the failed task's event"
        )
    finally:
        worker.stop()

    assert event["extra"]["celery-job"]["task_name"] == "app.tasks.add"
    assert event["transaction"] == "app.tasks.add"
    assert [value["type"] for value in event["exception"]["values"]][-1] == "TypeError"
    assert event["environment"] == "test-sink"
    assert event["release"] == project.__version__
    # One event for the one failure: Celery's and the logging integration's reports are deduplicated.
    assert len(events_of(sentry_sink, result.id)) == 1
    # send_default_pii is off: the task's arguments are not sent.
    assert event["extra"]["celery-job"]["args"] == "[Filtered]"


def sentry_initialised(**env) -> bool:
    """Whether the SDK is running once Django has loaded its settings, in a fresh process."""
    environment = {**os.environ, **env}
    if "SENTRY_DSN" not in env:
        environment.pop("SENTRY_DSN", None)
    code = "import django, sentry_sdk; django.setup(); print(sentry_sdk.is_initialized())"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.subprocess
def test_sentry_is_not_started_without_a_dsn():
    assert sentry_initialised() is False


@pytest.mark.integration
def test_sentry_is_started_with_a_dsn(sentry_sink):
    assert sentry_initialised(SENTRY_DSN=sentry_sink.dsn) is True
