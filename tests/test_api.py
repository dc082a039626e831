"""The JSON API: every endpoint's success path, bad input, authentication and unknown ids.

Enqueueing endpoints publish to the real broker; no worker runs here (tasks stay queued
and the worker fixture purges them), so these tests see the "queued" side of each id."""

import json
import time

import pytest

from app.models import ApiToken, Report, ReportStatus, TaskLog, TaskState
from app.result_backend import HISTORY_STREAM
from project.celery import app as celery_app
from tests.conftest import http, make_api_token

pytestmark = pytest.mark.django_db


def history_length() -> int:
    """Entries in the suite's history stream: each id recorded as queued appends one."""
    return celery_app.backend.client.xlen(HISTORY_STREAM)


ENQUEUE_CASES = [
    ("/api/simple-task/", {"operation": "multiply", "x": 6, "y": 7}, ["app.tasks.multiply"]),
    ("/api/chain-tasks/", {"value": 3}, [f"app.tasks.workflow_step_{n}" for n in (1, 2, 3)]),
    ("/api/group-tasks/", {"pairs": [{"x": 1, "y": 2}, {"x": 3, "y": 4}]}, ["app.tasks.add"] * 2),
    (
        "/api/chord-tasks/",
        {"chunks": [[1, 2], [3]]},
        ["app.tasks.process_data_chunk", "app.tasks.process_data_chunk", "app.tasks.aggregate_results"],
    ),
    ("/api/long-task/", {"total_steps": 3, "step_seconds": 0.1}, ["app.tasks.long_running_task"]),
    ("/api/long-task/", {"kind": "time_limited", "duration": 2, "soft_time_limit": 1}, ["app.tasks.time_limited_task"]),
    ("/api/retry-task/", {"fail_probability": 0.3}, ["app.tasks.task_with_retry"]),
    ("/api/create-users/", {"count": 10, "prefix": "api"}, ["app.tasks.create_users_batch"]),
    ("/api/generate-report/", {"report_type": "user_summary"}, ["app.tasks.generate_report"]),
]


@pytest.mark.parametrize(
    ("path", "body", "task_names"), ENQUEUE_CASES, ids=[c[0] + str(i) for i, c in enumerate(ENQUEUE_CASES)]
)
def test_enqueue_returns_202_with_ids_recorded_as_queued(api, path, body, task_names):
    response = api.post(path, body)

    assert response.status_code == 202, response.content
    data = response.json()
    assert data["status_url"] == f"/api/task-status/{data['task_id']}/"
    assert data["progress_url"] == f"/api/task-progress/{data['task_id']}/"
    stored = [celery_app.backend.stored_meta(task_id) for task_id in data["task_ids"]]
    assert [meta["name"] for meta in stored] == task_names
    assert {meta["status"] for meta in stored} == {"PENDING"}


def test_status_of_a_queued_task_is_pending_not_unknown(api):
    task_id = api.post("/api/simple-task/", {"x": 1, "y": 2}).json()["task_id"]

    response = api.get(f"/api/task-status/{task_id}/")

    assert response.status_code == 200
    assert response.json()["state"] == "PENDING"
    assert response.json()["task_name"] == "app.tasks.add"
    assert response.json()["ready"] is False


def test_progress_of_a_queued_task_is_zero(api):
    task_id = api.post("/api/long-task/", {"total_steps": 5}).json()["task_id"]

    response = api.get(f"/api/task-progress/{task_id}/")

    assert response.json() == {"task_id": task_id, "state": "PENDING", "current": 0, "total": None, "percent": 0.0}


def test_status_reads_a_finished_task_from_the_result_backend(api):
    from celery import states
    from celery.app.task import Context

    run = Context(id="done-1", task="app.tasks.add", args=[2, 3], retries=1, hostname="w@h")
    celery_app.backend.store_result("done-1", 5, states.SUCCESS, request=run)
    try:
        data = api.get("/api/task-status/done-1/").json()
    finally:
        celery_app.backend.forget("done-1")

    assert (data["state"], data["result"], data["ready"], data["retries"]) == ("SUCCESS", 5, True, 1)
    assert (data["task_name"], data["worker"]) == ("app.tasks.add", "w@h")


def test_status_of_a_task_whose_result_expired_comes_from_the_history(api):
    TaskLog.objects.create(task_id="old-1", task_name="app.tasks.add", state=TaskState.SUCCESS, result=5, retries=1)

    data = api.get("/api/task-status/old-1/").json()

    assert (data["state"], data["result"], data["ready"], data["retries"]) == ("SUCCESS", 5, True, 1)


def test_status_of_a_group_lists_its_children(api):
    data = api.post("/api/group-tasks/", {"pairs": [{"x": 1, "y": 1}, {"x": 2, "y": 2}]}).json()

    status = api.get(f"/api/task-status/{data['group_id']}/").json()

    assert status["task_name"] == "group"
    assert status["children"] == data["task_ids"]
    assert status["state"] == "PENDING"


def test_generate_report_creates_the_report_row_with_its_task_id(api):
    data = api.post(
        "/api/generate-report/",
        {"report_type": "task_summary", "filters": {"since": "2026-01-01T00:00:00Z", "task_name": "app.tasks.add"}},
    ).json()

    report = Report.objects.get(pk=data["report_id"])
    assert report.task_id == data["task_id"]
    assert report.status == ReportStatus.PENDING
    assert report.filters == {"since": "2026-01-01T00:00:00Z", "task_name": "app.tasks.add"}


@pytest.mark.parametrize("path", ["/api/task-status/no-such-id/", "/api/task-progress/no-such-id/"])
def test_unknown_task_id_is_404(api, path):
    response = api.get(path)

    assert response.status_code == 404
    assert "Unknown task id" in response.json()["detail"]


def test_revoke_of_unknown_id_is_404(api):
    assert api.post("/api/revoke-task/no-such-id/", {"terminate": True}).status_code == 404


def test_revoke_of_a_queued_task_is_accepted(api):
    task_id = api.post("/api/long-task/", {"total_steps": 5}).json()["task_id"]

    response = api.post(f"/api/revoke-task/{task_id}/", {"terminate": True})

    assert response.status_code == 202
    assert response.json() == {"task_id": task_id, "revoke_requested": True, "terminate": True}


BAD_INPUT_CASES = [
    ("/api/simple-task/", {"x": "a", "y": 1}, "x"),
    ("/api/simple-task/", {"x": 1}, "y"),
    ("/api/simple-task/", {"x": 1, "y": 2, "operation": "divide"}, "operation"),
    ("/api/simple-task/", {"x": 1e13, "y": 2}, "x"),
    ("/api/chain-tasks/", {"value": 10_000_001}, "value"),
    ("/api/chain-tasks/", {"value": 1.5}, "value"),
    ("/api/group-tasks/", {"pairs": []}, "pairs"),
    ("/api/group-tasks/", {"pairs": [{"x": 1, "y": 1}] * 1001}, "pairs"),
    ("/api/chord-tasks/", {"chunks": [[1]] * 1001}, "chunks"),
    ("/api/chord-tasks/", {"chunks": [list(range(1001))]}, '"chunks", 0'),
    ("/api/chord-tasks/", {"chunks": "nope"}, "chunks"),
    ("/api/long-task/", {"total_steps": 0}, "total_steps"),
    ("/api/long-task/", {"total_steps": 1001}, "total_steps"),
    ("/api/long-task/", {"step_seconds": -1}, "step_seconds"),
    ("/api/long-task/", {"total_steps": 31, "step_seconds": 10}, "soft time limit is 300 s"),
    ("/api/long-task/", {"kind": "time_limited", "soft_time_limit": 5, "time_limit": 3}, "soft_time_limit"),
    ("/api/long-task/", {"kind": "forever"}, "kind"),
    ("/api/retry-task/", {"fail_probability": 1.5}, "fail_probability"),
    ("/api/retry-task/", {"fail_times": 6}, "fail_times"),
    ("/api/create-users/", {"count": 10_001, "prefix": "ok"}, "count"),
    ("/api/create-users/", {"count": 0, "prefix": "ok"}, "count"),
    ("/api/create-users/", {"count": 5, "prefix": "Bad Prefix!"}, "prefix"),
    ("/api/create-users/", {"count": 5}, "prefix"),
    ("/api/generate-report/", {"report_type": "weather"}, "report_type"),
    (
        "/api/generate-report/",
        {"report_type": "task_summary", "filters": {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
        "since",
    ),
    ("/api/generate-report/", {"report_type": "task_summary", "filters": {"since": "yesterday"}}, "since"),
]


@pytest.mark.parametrize(
    ("path", "body", "field"), BAD_INPUT_CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(BAD_INPUT_CASES)]
)
def test_bad_input_is_a_422_naming_the_field_and_queues_nothing(api, path, body, field):
    before = history_length()
    response = api.post(path, body)

    assert response.status_code == 422, response.content
    assert response["Content-Type"] == "application/json; charset=utf-8"
    assert field in json.dumps(response.json()["detail"])
    assert history_length() == before
    assert Report.objects.count() == 0


def test_malformed_json_is_a_400(api, client, api_token):
    response = client.post(
        "/api/simple-task/",
        "{not json",
        content_type="application/json",
        headers={"Authorization": f"Bearer {api_token}"},
    )

    assert response.status_code == 400
    assert "Cannot parse request body" in response.json()["detail"]


MUTATING_PATHS = [case[0] for case in ENQUEUE_CASES] + ["/api/revoke-task/some-id/"]
READ_PATHS = ["/api/task-status/some-id/", "/api/task-progress/some-id/", "/api/task-overview/"]


@pytest.mark.parametrize("path", sorted(set(MUTATING_PATHS)))
@pytest.mark.parametrize("token", [None, "not-a-real-token"])
def test_mutating_endpoints_need_a_valid_token(api, path, token):
    response = api.post(path, {"x": 1, "y": 2}, token=token)

    assert response.status_code == 401
    assert response.json() == {"detail": "Unauthorized"}


@pytest.mark.parametrize("path", READ_PATHS)
@pytest.mark.parametrize("token", [None, "not-a-real-token"])
def test_reads_need_a_valid_token(api, path, token):
    response = api.get(path, token=token)

    assert response.status_code == 401
    assert response.json() == {"detail": "Unauthorized"}


@pytest.mark.parametrize("path", ["/api/health/", "/api/health/ready", "/api/health/live", "/api/openapi.json"])
def test_health_and_the_schema_need_no_token(api, path):
    assert api.get(path, token=None).status_code in (200, 503)


def test_a_read_token_reads_but_neither_enqueues_nor_revokes(api, api_token):
    started = api.post("/api/simple-task/", {"x": 1, "y": 2}).json()  # with the fixture's manage token
    reader = make_api_token("read")
    queued = history_length()

    assert api.get(f"/api/task-status/{started['task_id']}/", token=reader).status_code == 200
    assert api.get("/api/task-overview/", token=reader).status_code == 200
    enqueue = api.post("/api/simple-task/", {"x": 1, "y": 2}, token=reader)
    revoke = api.post(f"/api/revoke-task/{started['task_id']}/", {}, token=reader)

    assert (enqueue.status_code, revoke.status_code) == (403, 403)
    assert "has the scope 'read'; this needs 'enqueue'" in enqueue.json()["detail"]
    assert "this needs 'manage'" in revoke.json()["detail"]
    assert history_length() == queued  # nothing queued for a refused request


def test_an_enqueue_token_starts_tasks_but_does_not_revoke(api):
    token = make_api_token("enqueue")

    started = api.post("/api/simple-task/", {"x": 1, "y": 2}, token=token)
    revoke = api.post(f"/api/revoke-task/{started.json()['task_id']}/", {}, token=token)

    assert started.status_code == 202
    assert revoke.status_code == 403


def test_an_expired_token_is_refused_saying_so(api):
    import datetime as dt

    from django.utils import timezone

    token = make_api_token(expires_at=timezone.now() - dt.timedelta(seconds=1))
    valid = make_api_token(expires_at=timezone.now() + dt.timedelta(days=1))

    refused = api.get("/api/task-overview/", token=token)
    assert refused.status_code == 401
    assert "expired at" in refused.json()["detail"]
    assert api.get("/api/task-overview/", token=valid).status_code == 200


def test_the_last_use_is_written_once_a_minute_not_per_request(api, api_token):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    assert ApiToken.objects.get().last_used_at is None
    api.get("/api/task-overview/")
    first_use = ApiToken.objects.get().last_used_at
    assert first_use is not None

    with CaptureQueriesContext(connection) as queries:
        for _ in range(3):
            assert api.get("/api/task-overview/").status_code == 200
    assert not [query for query in queries if "app_apitoken" in query["sql"]]
    assert ApiToken.objects.get().last_used_at == first_use


def test_an_inactive_token_is_refused(api, api_token):
    ApiToken.objects.update(is_active=False)

    assert api.post("/api/simple-task/", {"x": 1, "y": 2}).status_code == 401
    assert api.get("/api/task-overview/").status_code == 401


def test_tokens_are_stored_only_as_digests(api_token):
    token = ApiToken.objects.get()
    assert api_token not in (token.digest, token.prefix, token.name)
    assert token.digest == ApiToken.digest_of(api_token)


def test_the_schema_says_which_endpoints_need_a_token(api):
    schema = api.get("/api/openapi.json").json()

    for path, operations in schema["paths"].items():
        for operation in operations.values():
            public = path.startswith("/api/health/")
            assert ("security" not in operation) == public, path
            if not public:
                assert {"401", "403"} <= set(operation["responses"]), path


def test_health_reports_each_dependency(api):
    response = api.get("/api/health/")

    assert response.status_code == 200
    data = response.json()
    assert data["healthy"] is True
    assert set(data["checks"]) == {"database", "cache", "broker", "result_backend"}


def test_task_overview_counts_by_state_and_task(api):
    import datetime as dt

    TaskLog.objects.create(task_id="a", task_name="app.tasks.add", state="SUCCESS", duration=dt.timedelta(seconds=1))
    TaskLog.objects.create(task_id="b", task_name="app.tasks.add", state="SUCCESS", duration=dt.timedelta(seconds=3))
    TaskLog.objects.create(task_id="c", task_name="app.tasks.multiply", state="FAILURE")

    data = api.get("/api/task-overview/").json()

    assert data["total"] == 3
    assert data["by_state"]["SUCCESS"] == 2
    assert data["by_state"]["FAILURE"] == 1
    add = next(row for row in data["by_task"] if row["task_name"] == "app.tasks.add")
    assert add == {
        "task_name": "app.tasks.add",
        "total": 2,
        "succeeded": 2,
        "failed": 0,
        "average_duration_seconds": 2.0,
        "max_duration_seconds": 3.0,
    }


def test_openapi_schema_lists_every_endpoint(api):
    paths = set(api.get("/api/openapi.json").json()["paths"])

    assert paths == {
        "/api/simple-task/",
        "/api/chain-tasks/",
        "/api/group-tasks/",
        "/api/chord-tasks/",
        "/api/long-task/",
        "/api/retry-task/",
        "/api/create-users/",
        "/api/generate-report/",
        "/api/task-status/{task_id}/",
        "/api/task-progress/{task_id}/",
        "/api/revoke-task/{task_id}/",
        "/api/health/",
        "/api/health/ready",
        "/api/health/live",
        "/api/task-overview/",
    }


def docs_example(schema: dict, components: dict):
    """The value Swagger UI's "Try it out" starts a body with: the schema's example, else its
    default, else its first choice, else an object of its properties' values. Nothing else: a
    field with none of these would get its bounds (x = -1e12) or a random string."""
    if "$ref" in schema:
        return docs_example(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "allOf" in schema:
        (only,) = schema["allOf"]
        return docs_example(only, components)
    if "examples" in schema:
        return schema["examples"][0]
    if "default" in schema:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    assert schema.get("type") == "object", f"no example, default or choices: {schema}"
    return {name: docs_example(field, components) for name, field in schema["properties"].items()}


def test_the_docs_example_body_of_every_endpoint_is_accepted(api):
    schema = api.get("/api/openapi.json").json()
    queued = api.post("/api/simple-task/", {"x": 1, "y": 2}).json()["task_id"]

    bodies = {
        path.replace("{task_id}", queued): docs_example(
            operation["requestBody"]["content"]["application/json"]["schema"], schema["components"]["schemas"]
        )
        for path, operations in schema["paths"].items()
        for operation in operations.values()
        if "requestBody" in operation
    }

    assert len(bodies) == 9
    assert bodies["/api/simple-task/"] == {"x": 2, "y": 3, "operation": "add"}
    for path, body in bodies.items():
        response = api.post(path, body)
        assert response.status_code == 202, (path, body, response.content)


def test_the_api_root_says_where_things_are_and_the_docs_answer_with_a_slash_too(client):
    assert client.get("/api").headers["Location"] == "/api/"
    index = client.get("/api/")
    assert index.status_code == 200
    assert client.get(index.json()["docs"]).status_code == 200
    assert client.get(index.json()["openapi"]).status_code == 200
    with_slash = client.get("/api/docs/")
    assert (with_slash.status_code, with_slash.headers["Location"]) == (301, "/api/docs")


def test_docs_page_uses_local_static_files(api):
    response = api.get("/api/docs")

    assert response.status_code == 200
    assert b"swagger-ui-bundle.js" in response.content
    assert b"cdn" not in response.content.lower()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_unreachable_broker_is_a_fast_503_and_queues_nothing(start_web, api_token):
    from tests.resources import free_port

    base = start_web(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    headers = {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"}
    before = history_length()

    for path, body, _names in ENQUEUE_CASES:
        started = time.monotonic()
        status, content = http("POST", base + path, json.dumps(body).encode(), headers)
        elapsed = time.monotonic() - started
        assert status == 503, (path, content)
        assert json.loads(content)["detail"].startswith("The message broker is unavailable")
        assert elapsed < 2.0, f"{path} took {elapsed:.2f} s"
    assert history_length() == before  # no id recorded as queued
    # The report row is kept, marked failed, so the request loses nothing silently.
    assert list(Report.objects.values_list("status", flat=True)) == [ReportStatus.FAILED]

    status, content = http("GET", base + "/api/health/")
    assert status == 503
    assert json.loads(content)["checks"]["broker"]["healthy"] is False


def test_an_enqueue_makes_no_database_query(api, django_assert_num_queries):
    api.post("/api/simple-task/", {"x": 1, "y": 2})  # this process loads the active tokens once

    # The token from this process's copy (checked against the cache's generation), the task to
    # the broker, its id to the result backend: the database is not on the path.
    with django_assert_num_queries(0):
        assert api.post("/api/simple-task/", {"x": 1, "y": 2}).status_code == 202


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_disabled_or_deleted_token_is_refused_by_every_web_process_on_the_next_request(start_web):
    from django.contrib.auth import get_user_model

    from app import services

    owner = get_user_model().objects.create_user("rotating")
    token, secret = services.create_api_token(name="rotating", owner=owner)

    def statuses() -> set[int]:
        # New connections, spread over both gunicorn workers.
        body, headers = json.dumps({"x": 1, "y": 2}).encode(), {"Authorization": f"Bearer {secret}"}
        headers["Content-Type"] = "application/json"
        return {http("POST", f"{base}/api/simple-task/", body, headers)[0] for _ in range(8)}

    base = start_web(concurrency=2)
    assert statuses() == {202}

    token.is_active = False  # as the admin saves it
    token.save()
    assert statuses() == {401}

    token.is_active = True
    token.save()
    assert statuses() == {202}

    token.scope = "read"
    token.save()
    assert statuses() == {403}

    token.delete()
    assert statuses() == {401}


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_an_unreachable_result_backend_is_a_503_for_reads_and_never_fails_an_enqueue(start_web, api_token):
    from tests.resources import free_port

    base = start_web(RESULT_BACKEND_URL=f"redis://127.0.0.1:{free_port()}/0")
    headers = {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"}

    # Published: the task runs and stores its states once the backend is back; only "queued" is lost.
    status, content = http("POST", base + "/api/simple-task/", json.dumps({"x": 1, "y": 2}).encode(), headers)
    assert status == 202, content
    task_id = json.loads(content)["task_id"]

    status, content = http("GET", f"{base}/api/task-status/{task_id}/", headers=headers)
    assert status == 503
    assert json.loads(content)["detail"].startswith("The result backend is unavailable")
