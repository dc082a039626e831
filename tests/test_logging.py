"""Structured logs from real processes: gunicorn (with project/gunicorn_conf.py) and a prefork
Celery worker log one JSON object per line, and one request's id reaches the worker's lines for
every task of the chord it started, the callback included. With DJANGO_DEBUG the lines are text."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
import structlog
from billiard.exceptions import WorkerLostError
from celery.exceptions import TimeLimitExceeded

from project import logging_config
from tests import processes
from tests.conftest import celery_app_for, make_api_token, wait_until
from tests.processes import REPO_ROOT, Service
from tests.resources import empty_redis_db

# In a parallel run this module stays in one process: its workers are started once for the module.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("logging")]


def json_lines(text: str) -> list[dict]:
    """Every line parsed as JSON: fails on the first line that is not."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers)


def post_json(url: str, body: dict, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def broker_url() -> str:
    with empty_redis_db() as url:
        yield url


def start_json_worker(broker_url, log_dir, metrics_dir, *, name: str, queues: str, concurrency: int, **env) -> Service:
    """A real prefork worker logging JSON, started as the image starts it. --quiet: no start-up
    banner, which Celery prints rather than logs, so every line of its output is a log line."""
    return processes.start_worker(
        celery_app_for(broker_url),
        broker_url=broker_url,
        log_dir=log_dir,
        name=name,
        queues=queues,
        concurrency=concurrency,
        quiet=True,
        LOG_FORMAT="json",
        PROMETHEUS_MULTIPROC_BASE_DIR=metrics_dir,
        **env,
    )


@pytest.fixture(scope="module")
def json_worker(broker_url, django_db_setup, django_db_blocker, service_log_dir, tmp_path_factory):
    with django_db_blocker.unblock():
        service = start_json_worker(
            broker_url,
            service_log_dir,
            tmp_path_factory.mktemp("worker-metrics"),
            name="logs",
            queues="default,long",
            concurrency=2,
        )
    yield service
    service.stop()


@pytest.fixture
def json_web(broker_url, service_log_dir, tmp_path):
    """gunicorn as the web role runs it (project/gunicorn_conf.py), logging JSON."""
    service = processes.start_web(
        log_dir=service_log_dir, workdir=tmp_path, CELERY_BROKER_URL=broker_url, LOG_FORMAT="json"
    )
    yield service
    service.stop()


def lines_with(lines: list[dict], **fields) -> list[dict]:
    return [line for line in lines if all(line.get(key) == value for key, value in fields.items())]


@pytest.mark.django_db(transaction=True)
def test_web_logs_json_lines_with_request_id_method_path_status_and_duration(json_web):
    token = make_api_token("read")
    status, headers = get(
        f"{json_web.url}/api/task-overview/?window=1",
        {"X-Request-ID": "req-logging-1", "Authorization": f"Bearer {token}"},
    )
    assert status == 200
    assert headers["X-Request-ID"] == "req-logging-1"

    def finished():
        lines = json_lines(json_web.log())
        django_line = lines_with(lines, event="request_finished", request_id="req-logging-1")
        access_line = lines_with(lines, logger="gunicorn.access", request_id="req-logging-1")
        return (lines, django_line[0], access_line[0]) if django_line and access_line else None

    lines, django_line, access_line = wait_until(finished, timeout=10, message="the request's log lines")
    for line in (django_line, access_line):
        assert line["method"] == "GET"
        assert line["path"] == "/api/task-overview/"
        assert line["status"] == 200
        assert line["duration_ms"] > 0
        assert line["level"] == "info"
        assert line["timestamp"].endswith("Z")
    assert access_line["query"] == "window=1"
    assert token not in json_web.log()
    # gunicorn's own lines (start-up, workers) are JSON too.
    assert any(line["logger"] == "gunicorn.error" and "Booting worker" in line["event"] for line in lines)


@pytest.mark.django_db(transaction=True)
def test_a_request_without_an_id_gets_one_in_its_response_and_its_log_lines(json_web):
    _, headers = get(f"{json_web.url}/api/task-overview/", {"Authorization": f"Bearer {make_api_token('read')}"})
    request_id = headers["X-Request-ID"]
    assert uuid.UUID(request_id)

    def both_lines():
        lines = json_lines(json_web.log())
        return lines_with(lines, event="request_finished", request_id=request_id) and lines_with(
            lines, logger="gunicorn.access", request_id=request_id
        )

    wait_until(both_lines, timeout=10, message="a Django and an access line with the generated id")


def start_from_web(web: Service, path: str, body: dict, *, token: str, request_id: str) -> list[str]:
    """POST to the API with a request id; returns the ids of the tasks it started."""
    status, response = post_json(
        f"{web.url}{path}", body, {"Authorization": f"Bearer {token}", "X-Request-ID": request_id}
    )
    assert status == 202
    return response["task_ids"]


def task_finished_lines(worker: Service, task_ids: list[str], *, count: int | None = None) -> list[dict]:
    """The worker's whole log once it has `count` task_finished lines for these ids (default:
    one per id)."""

    def ready():
        lines = json_lines(worker.log())
        finished = [line for line in lines_with(lines, event="task_finished") if line["task_id"] in task_ids]
        return lines if len(finished) >= (count or len(task_ids)) else None

    return wait_until(ready, timeout=60, message=f"task_finished lines for {task_ids}")


@pytest.mark.django_db(transaction=True)
def test_a_request_id_reaches_every_worker_line_of_its_chord_including_the_callback(json_web, json_worker, api_token):
    request_id = f"chord-{uuid.uuid4().hex[:12]}"
    task_ids = start_from_web(
        json_web, "/api/chord-tasks/", {"chunks": [[1, 2], [3, 4], [5]]}, token=api_token, request_id=request_id
    )
    header_ids, callback_id = task_ids[:-1], task_ids[-1]

    lines = task_finished_lines(json_worker, task_ids)
    finished = {line["task_id"]: line for line in lines_with(lines, event="task_finished")}
    for task_id in header_ids:
        line = finished[task_id]
        assert line["task_name"] == "app.tasks.process_data_chunk"
        assert line["state"] == "SUCCESS"
        assert line["queue"] == "default"
        assert line["retries"] == 0
        assert line["duration_ms"] >= 0
        assert line["request_id"] == request_id
    callback = finished[callback_id]
    assert callback["task_name"] == "app.tasks.aggregate_results"
    assert callback["state"] == "SUCCESS"
    assert callback["request_id"] == request_id
    # The callback was published by the worker that ran the last chunk.
    assert callback["parent_task_id"] in header_ids

    # One line per run, by default: no task_started line, no Celery received/succeeded lines.
    task_lines = [line for line in lines if line.get("task_id") in task_ids]
    assert [line["event"] for line in task_lines] == ["task_finished"] * len(task_ids)
    assert not [line for line in lines if " received" in line["event"] or " succeeded in " in line["event"]]


@pytest.mark.django_db(transaction=True)
def test_a_request_id_reaches_every_step_of_its_chain(json_web, json_worker, api_token):
    request_id = f"chain-{uuid.uuid4().hex[:12]}"
    task_ids = start_from_web(json_web, "/api/chain-tasks/", {"value": 3}, token=api_token, request_id=request_id)

    lines = task_finished_lines(json_worker, task_ids)

    finished = {line["task_id"]: line for line in lines_with(lines, event="task_finished")}
    assert [finished[task_id]["task_name"] for task_id in task_ids] == [
        "app.tasks.workflow_step_1",
        "app.tasks.workflow_step_2",
        "app.tasks.workflow_step_3",
    ]
    assert all(finished[task_id]["request_id"] == request_id for task_id in task_ids)
    # Steps 2 and 3 were published by the worker, each by the step before it.
    assert [finished[task_id].get("parent_task_id") for task_id in task_ids] == [None, *task_ids[:2]]


@pytest.mark.django_db(transaction=True)
def test_a_retried_task_logs_each_run_with_its_state_and_retry_count(json_web, json_worker, api_token):
    request_id = f"retry-{uuid.uuid4().hex[:12]}"
    [task_id] = start_from_web(json_web, "/api/retry-task/", {"fail_times": 1}, token=api_token, request_id=request_id)

    lines = task_finished_lines(json_worker, [task_id], count=2)

    # By retry count: the second run can finish before the first has logged its end.
    runs = sorted(
        (line for line in lines_with(lines, event="task_finished") if line["task_id"] == task_id),
        key=lambda line: line["retries"],
    )
    assert [(run["state"], run["retries"]) for run in runs] == [("RETRY", 0), ("SUCCESS", 1)]
    assert all(run["request_id"] == request_id and run["task_name"] == "app.tasks.task_with_retry" for run in runs)
    assert "TransientError" in runs[0]["exception"]  # the retry's reason
    assert "exception" not in runs[1]


@pytest.mark.django_db(transaction=True)
def test_a_task_killed_at_its_hard_time_limit_logs_one_failed_line_and_no_success(json_worker, broker_url):
    app = celery_app_for(broker_url)
    # The clean-up after the soft limit outlasts the hard limit: the worker kills the child.
    task_id = app.send_task(
        "app.tasks.time_limited_task", args=[30], kwargs={"cleanup_seconds": 30}, soft_time_limit=0.5, time_limit=1
    ).id

    lines = task_finished_lines(json_worker, [task_id])
    time.sleep(1)  # a second line, if any, would follow at once
    lines = json_lines(json_worker.log())

    [finished] = [line for line in lines_with(lines, event="task_finished") if line["task_id"] == task_id]
    assert (finished["state"], finished["task_name"]) == ("FAILURE", "app.tasks.time_limited_task")
    assert finished["exception"].startswith("TimeLimitExceeded")
    mentioning = [line["event"] for line in lines if task_id in json.dumps(line)]
    assert not [event for event in mentioning if "succeeded" in event]
    assert any(event.startswith("Hard time limit (1") for event in mentioning)


@pytest.mark.parametrize("log_format", logging_config.LOG_FORMATS)
@pytest.mark.parametrize(
    "exception", [TimeLimitExceeded(2.0), WorkerLostError("lost"), KeyError("k"), ValueError(), Exception(None)]
)
def test_a_failure_line_renders_any_exception_object_in_both_formats(log_format, exception):
    """django-structlog's task_failed line passes the exception object as a field; the console
    renderer used to raise on it (TypeError: can only concatenate str)."""
    processors = logging_config.build(log_format=log_format, level="INFO")["formatters"]["structlog"]["processors"]
    event = {"event": "task_failed", "error": str(exception), "exception": exception, "exc_info": True}
    event.update(_record=None, _from_structlog=True)

    for processor in processors:
        event = processor(None, "error", event)

    assert isinstance(event, str)
    assert repr(exception) in (json.loads(event)["exception"] if log_format == "json" else event)


@pytest.fixture(scope="module")
def every_line_worker(broker_url, django_db_setup, django_db_blocker, service_log_dir, tmp_path_factory):
    """A worker with LOG_CELERY_TASK_LINES on (Celery's own lines for every task too), on a queue
    of its own."""
    with django_db_blocker.unblock():
        service = start_json_worker(
            broker_url,
            service_log_dir,
            tmp_path_factory.mktemp("every-line-metrics"),
            name="every-line",
            queues="every-line",
            concurrency=1,
            LOG_CELERY_TASK_LINES="true",
        )
    yield service
    service.stop()


@pytest.mark.django_db(transaction=True)
def test_with_celery_task_lines_on_every_task_also_logs_received_started_and_succeeded(every_line_worker, broker_url):
    app = celery_app_for(broker_url)
    with structlog.contextvars.bound_contextvars(request_id="r-1"):  # as a web request would
        task_id = app.send_task("app.tasks.add", args=[2, 3], queue="every-line").id

    lines = task_finished_lines(every_line_worker, [task_id])

    mentioning = [line for line in lines if task_id in json.dumps(line)]
    events = [line["event"] for line in mentioning]
    assert any(event.endswith(f"[{task_id}] received") for event in events)
    assert "task_started" in events
    assert any(f"[{task_id}] succeeded in" in event for event in events)
    assert all(line["request_id"] == "r-1" for line in mentioning if line.get("task_id") == task_id)


@pytest.mark.django_db(transaction=True)
def test_with_debug_on_the_logs_are_readable_text_not_json(start_web, service_log_dir):
    url = start_web(DJANGO_DEBUG="true")
    get(f"{url}/api/task-overview/", {"X-Request-ID": "req-console-1", "Authorization": f"Bearer {make_api_token()}"})
    log_path = service_log_dir / f"web-{url.rsplit(':', 1)[1]}.log"  # tests/processes.py start_web's log

    line = wait_until(
        lambda: next((li for li in log_path.read_text().splitlines() if "request_finished" in li), None),
        timeout=10,
        message="the request_finished line",
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    for text in ("[info", "request_finished", "method=GET", "path=/api/task-overview/", "status=200"):
        assert text in line
    assert "request_id=req-console-1" in line

    # A redirect is logged with the status it answered; a 404 once, formatted (it was also printed raw).
    with pytest.raises(urllib.error.HTTPError):
        get(f"{url}/nowhere/")
    get(f"{url}/api")

    def both_logged():
        lines = log_path.read_text().splitlines()
        finished = [li for li in lines if "request_finished" in li and ("path=/api " in li or "path=/nowhere/" in li)]
        return lines if len(finished) == 2 else None

    lines = wait_until(both_logged, timeout=10, message="the 301 and 404 request_finished lines")
    assert any("path=/api " in li and "status=301" in li for li in lines)
    not_found = [li for li in lines if "Not Found: /nowhere/" in li]
    assert len(not_found) == 1
    assert "[warning" in not_found[0]


def test_an_unknown_log_format_stops_start_up_with_a_clear_error():
    run = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=REPO_ROOT,
        env={**os.environ, "LOG_FORMAT": "xml"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert run.returncode != 0
    assert "LOG_FORMAT='xml': use one of json, console." in run.stderr


def test_a_lost_acknowledgement_is_a_warning_that_says_the_message_comes_again(capsys):
    import logging.config

    from amqp.exceptions import RecoverableConnectionError
    from django.conf import settings

    logging.config.dictConfig(logging_config.build(log_format="json", level="INFO"))
    try:
        # What kombu's Message.ack_log_error logs when the connection dropped before the ack.
        logging.getLogger("celery.worker.request").critical(
            "Couldn't ack %r, reason:%r", 7, RecoverableConnectionError("connection already closed")
        )
        logging.getLogger("celery.worker.request").critical("Unrecoverable error: %r", KeyError("k"))
    finally:
        logging.config.dictConfig(settings.LOGGING)

    ack, other = json_lines(capsys.readouterr().err)
    assert ack["level"] == "warning"
    assert ack["event"].startswith("Couldn't ack 7, reason:RecoverableConnectionError")
    assert ack["event"].endswith("(the broker delivers the message again)")
    assert other["level"] == "critical"  # anything else keeps its level
