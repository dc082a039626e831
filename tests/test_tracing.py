"""OpenTelemetry traces (project/tracing.py): a real gunicorn web and a real prefork worker
export to an OTLP/HTTP receiver on loopback that decodes what it gets; one request's trace
holds the request and every task it started, and their log lines carry its ids."""

import json

import pytest
from celery.result import AsyncResult

from project import tracing
from tests.conftest import celery_app_for, http, make_api_token, wait_until
from tests.otlp_receiver import OtlpReceiver
from tests.processes import start_web, start_worker
from tests.resources import empty_redis_db

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER
STEPS = [f"app.tasks.workflow_step_{n}" for n in (1, 2, 3)]


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
    ],
)
def test_tracing_is_on_only_with_an_otlp_endpoint(environ, on):
    assert tracing.enabled(environ) is on


def json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_one_trace_holds_a_request_and_each_step_of_the_chain_it_started(service_log_dir, tmp_path):
    with empty_redis_db() as broker_url, OtlpReceiver() as receiver:
        traced = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans leave within a moment
            "LOG_FORMAT": "json",
        }
        app = celery_app_for(broker_url)
        worker = start_worker(app, broker_url=broker_url, log_dir=service_log_dir, **traced)
        web = start_web(
            log_dir=service_log_dir,
            workdir=tmp_path,
            CELERY_BROKER_URL=broker_url,
            PROMETHEUS_MULTIPROC_BASE_DIR=tmp_path / "metrics",
            **traced,
        )
        try:
            token = make_api_token("enqueue")
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            status, body = http("POST", f"{web.url}/api/chain-tasks/", b'{"value": 3}', headers)
            assert status == 202, body
            task_ids = json.loads(body)["task_ids"]
            assert AsyncResult(task_ids[-1], app=app).get(timeout=30) == {"input": 16, "result": 256}

            def the_trace():
                spans = receiver.received()
                servers = [s for s in spans if s.kind == SERVER_KIND and "chain-tasks" in s.name]
                runs = {s.name: s for s in spans if s.name.startswith("run/")}
                if servers and all(f"run/{step}" in runs for step in STEPS):
                    return servers[0], [runs[f"run/{step}"] for step in STEPS], spans
                return None

            request, steps, spans = wait_until(the_trace, timeout=30, message="the request's and the tasks' spans")
        finally:
            web.stop()
            worker.stop()

    assert request.service == "django-celery-k8s-web"
    assert {step.trace_id for step in steps} == {request.trace_id}
    assert {step.service for step in steps} == {"django-celery-k8s-worker"}
    assert [step.start_ns for step in steps] == sorted(step.start_ns for step in steps)
    assert [step.attributes.get("celery.task_name") for step in steps] == STEPS
    # Each step's parent is a publish in the same trace: the request's, then the previous step's.
    by_id = {span.span_id: span for span in spans}
    publishers = [by_id[step.parent_span_id] for step in steps]
    assert [p.name for p in publishers] == [f"apply_async/{step}" for step in STEPS]
    assert [p.parent_span_id for p in publishers] == [request.span_id, steps[0].span_id, steps[1].span_id]

    # The log lines written inside those spans carry their ids.
    web_lines = [line for line in json_lines(web.log()) if line.get("event") == "request_finished"]
    assert [line["trace_id"] for line in web_lines if line.get("path") == "/api/chain-tasks/"] == [request.trace_id]
    finished = {line["task_id"]: line for line in json_lines(worker.log()) if line.get("event") == "task_finished"}
    for task_id, step in zip(task_ids, steps, strict=True):
        assert (finished[task_id]["trace_id"], finished[task_id]["span_id"]) == (step.trace_id, step.span_id)


def test_sentry_events_are_tagged_with_the_trace_they_happened_in(monkeypatch):
    from project import sentry

    monkeypatch.setattr(tracing, "current_ids", lambda: {"trace_id": "ab" * 16, "span_id": "cd" * 8})
    event = sentry.with_trace_ids({"tags": {"role": "web"}}, None)

    assert event["tags"] == {"role": "web", "trace_id": "ab" * 16, "span_id": "cd" * 8}
    monkeypatch.setattr(tracing, "current_ids", lambda: {})
    assert sentry.with_trace_ids({}, None) == {}


def test_outside_a_span_there_are_no_ids():
    assert tracing.current_ids() == {}
