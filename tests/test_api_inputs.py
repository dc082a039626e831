"""Hostile input against every /api/ endpoint: each answer is a 4xx with the API's JSON error
body, never a server error, and nothing is queued (no message on the broker, no id recorded, no
report row). Every request sends a valid token, reads included."""

import json
import socket
import uuid
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from app import schemas
from app.models import Report, TaskLog
from app.result_backend import HISTORY_STREAM
from project.celery import app as celery_app
from tests.conftest import http

pytestmark = pytest.mark.django_db

# Each body endpoint with a body it accepts; hostile inputs are variations on it.
BODY_ENDPOINTS = {
    "/api/simple-task/": {"operation": "add", "x": 1, "y": 2},
    "/api/chain-tasks/": {"value": 3},
    "/api/group-tasks/": {"pairs": [{"x": 1, "y": 2}]},
    "/api/chord-tasks/": {"chunks": [[1, 2], [3]]},
    "/api/long-task/": {"total_steps": 2, "step_seconds": 0.1},
    "/api/retry-task/": {"fail_probability": 0.5},
    "/api/create-users/": {"count": 1, "prefix": "fuzz"},
    "/api/generate-report/": {"report_type": "task_summary", "filters": {"task_name": "app.tasks.add"}},
    "/api/revoke-task/{known}/": {"terminate": True},
}
READ_ENDPOINTS = ["/api/task-status/{id}/", "/api/task-progress/{id}/"]
ALL_GET_PATHS = [
    "/api/health/",
    "/api/health/ready",
    "/api/health/live",
    "/api/task-overview/",
    "/api/openapi.json",
    "/api/task-status/{known}/",
    "/api/task-progress/{known}/",
]
KNOWN_ID = "known-0f8c2a"


@pytest.fixture
def known_task():
    """A task id the API knows (from the history), so revoke-task reaches its body checks."""
    TaskLog.objects.create(task_id=KNOWN_ID, task_name="app.tasks.add", state="SUCCESS", result=3)
    return KNOWN_ID


@pytest.fixture
def send(client, api_token, known_task):
    """POST raw bytes with a content type (None: no Content-Type header) and the valid token."""

    def send(path: str, body: bytes, content_type: str | None = "application/json", **headers):
        path = path.format(known=known_task)
        headers = {"Authorization": f"Bearer {api_token}", **headers}
        if content_type is None:
            return client.generic("POST", path, body, headers=headers)
        return client.generic("POST", path, body, content_type=content_type, headers=headers)

    return send


def queued_messages() -> int:
    """Messages waiting in the default and long queues of the suite's broker."""
    from amqp.exceptions import ChannelError

    total = 0
    with celery_app.connection_for_write() as connection:
        for name in (settings.CELERY_TASK_DEFAULT_QUEUE, settings.CELERY_LONG_QUEUE):
            try:
                total += connection.default_channel.queue_declare(queue=name, passive=True).message_count
            except ChannelError:  # Redis: a queue that never held a message does not exist
                pass
    return total


@pytest.fixture
def nothing_queued(known_task):
    """Asserts, after the test, that no message reached the broker, no id was recorded as queued
    and no report row was written."""
    history = celery_app.backend.client.xlen(HISTORY_STREAM)
    messages = queued_messages()
    yield
    assert celery_app.backend.client.xlen(HISTORY_STREAM) == history, "an id was recorded as queued"
    assert queued_messages() == messages, "a message reached the broker"
    assert not Report.objects.exists(), "a report row was written"


def _json_content_type(response) -> str:
    return response["Content-Type"].split(";")[0]


def assert_error(response, status: int | None = None) -> object:
    """A 4xx (of `status` if given) with the {"detail": ...} body, whatever charset it names."""
    assert _json_content_type(response) == "application/json", (response.status_code, response.content[:300])
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    if status is not None:
        assert response.status_code == status, response.content[:300]
    body = response.json()
    assert set(body) == {"detail"}, body
    return body["detail"]


# --- Bodies that are not JSON, or not an object -------------------------------------------------

MALFORMED_BODIES = {
    "invalid UTF-8": b'{"x": "\xff\xfe"}',
    "UTF-16": json.dumps({"x": 1}).encode("utf-16"),
    "deep array nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep object nesting": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "a number of 5,000 digits": b'{"x": ' + b"9" * 5_000 + b"}",
    "NaN literal": b'{"x": NaN, "y": 1}',
    "Infinity literal": b'{"x": Infinity, "y": 1}',
    "raw NUL byte": b'{"x": 1, "y": 2, "operation": "a\x00"}',
    "truncated": b'{"x": 1',
    "trailing garbage": b'{"x": 1} {"y": 2}',
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
@pytest.mark.parametrize("path", BODY_ENDPOINTS)
def test_a_body_that_is_not_strict_json_is_a_400(send, nothing_queued, path, body):
    assert "Cannot parse request body" in assert_error(send(path, body), 400)


NOT_AN_OBJECT = {"array": [], "array of nulls": [None, None], "null": None, "string": "x", "number": 1, "true": True}


@pytest.mark.parametrize("value", NOT_AN_OBJECT.values(), ids=NOT_AN_OBJECT.keys())
@pytest.mark.parametrize("path", [p for p in BODY_ENDPOINTS if "revoke" not in p])
def test_a_body_that_is_not_an_object_is_a_422(send, nothing_queued, path, value):
    detail = assert_error(send(path, json.dumps(value).encode()), 422)
    assert detail[0]["loc"] == ["body", "body"], detail
    assert detail[0]["msg"].startswith("Input should be a valid dictionary"), detail


@pytest.mark.parametrize("value", NOT_AN_OBJECT.values(), ids=NOT_AN_OBJECT.keys())
def test_revoke_refuses_a_body_that_is_not_an_object(send, nothing_queued, value):
    detail = assert_error(send("/api/revoke-task/{known}/", json.dumps(value).encode()), 422)
    assert detail[0]["loc"] == ["body", "body"], detail


def test_revoke_without_a_body_takes_the_defaults(send):
    response = send("/api/revoke-task/{known}/", b"", content_type=None)

    assert response.status_code == 202, response.content
    assert response.json()["terminate"] is False


@pytest.mark.parametrize("path", [p for p in BODY_ENDPOINTS if "revoke" not in p])
def test_a_missing_body_is_a_422(send, nothing_queued, path):
    assert_error(send(path, b""), 422)
    assert_error(send(path, b"", content_type=None), 422)


def test_a_filters_value_that_is_not_an_object_is_a_422(send, nothing_queued):
    for filters in ([None, None], [], "since", 1):
        body = json.dumps({"report_type": "task_summary", "filters": filters}).encode()
        detail = assert_error(send("/api/generate-report/", body), 422)
        assert "filters" in json.dumps(detail)


# --- Content types and sizes ---------------------------------------------------------------------

WRONG_CONTENT_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/xml",
    "application/json; charset=latin-1",
    "application/jsonx",
    None,
]


@pytest.mark.parametrize("content_type", WRONG_CONTENT_TYPES, ids=[str(c) for c in WRONG_CONTENT_TYPES])
@pytest.mark.parametrize("path", BODY_ENDPOINTS)
def test_a_json_body_sent_as_another_content_type_is_a_415(send, nothing_queued, path, content_type):
    body = json.dumps(BODY_ENDPOINTS[path]).encode()

    detail = assert_error(send(path, body, content_type=content_type), 415)

    assert "application/json" in detail


@pytest.mark.parametrize("path", BODY_ENDPOINTS)
def test_a_body_over_the_limit_is_a_413(send, nothing_queued, path):
    body = b'{"x": "' + b"a" * (10 * 1024 * 1024) + b'"}'

    detail = assert_error(send(path, body), 413)

    assert str(settings.API_MAX_BODY_BYTES) in detail


def test_the_body_limit_comes_from_the_setting(send, settings):
    settings.API_MAX_BODY_BYTES = settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 64
    body = json.dumps({"x": 1, "y": 2}).encode()

    assert send("/api/simple-task/", body + b" " * (64 - len(body))).status_code == 202
    assert "at most 64 are accepted" in assert_error(send("/api/simple-task/", body + b" " * (65 - len(body))), 413)


def test_a_json_content_type_with_utf8_charset_is_accepted(send):
    body = json.dumps({"x": 1, "y": 2}).encode()

    response = send("/api/simple-task/", body, content_type="application/json; charset=UTF-8")

    assert response.status_code == 202, response.content


# --- Types: no coercion --------------------------------------------------------------------------

WRONG_TYPES = [
    ("/api/chain-tasks/", {"value": False}, "value"),
    ("/api/chain-tasks/", {"value": True}, "value"),
    ("/api/chain-tasks/", {"value": "3"}, "value"),
    ("/api/chain-tasks/", {"value": 3.5}, "value"),
    ("/api/chain-tasks/", {"value": 1e300}, "value"),
    ("/api/chain-tasks/", {"value": None}, "value"),
    ("/api/simple-task/", {"x": True, "y": 1}, "x"),
    ("/api/simple-task/", {"x": "1", "y": 1}, "x"),
    ("/api/simple-task/", {"x": 1, "y": [1]}, "y"),
    ("/api/simple-task/", {"x": 1, "y": {"v": 1}}, "y"),
    ("/api/simple-task/", {"x": 1, "y": 2, "operation": 1}, "operation"),
    ("/api/group-tasks/", {"pairs": [{"x": False, "y": 1}]}, "x"),
    ("/api/group-tasks/", {"pairs": {"x": 1, "y": 1}}, "pairs"),
    ("/api/chord-tasks/", {"chunks": [[1, True]]}, "chunks"),
    ("/api/chord-tasks/", {"chunks": [["1"]]}, "chunks"),
    ("/api/chord-tasks/", {"chunks": [1, 2]}, "chunks"),
    ("/api/long-task/", {"total_steps": True}, "total_steps"),
    ("/api/long-task/", {"total_steps": "5"}, "total_steps"),
    ("/api/long-task/", {"step_seconds": "0.5"}, "step_seconds"),
    ("/api/long-task/", {"kind": "time_limited", "duration": False}, "duration"),
    ("/api/retry-task/", {"fail_probability": True}, "fail_probability"),
    ("/api/retry-task/", {"fail_times": "1"}, "fail_times"),
    ("/api/create-users/", {"count": True, "prefix": "ok"}, "count"),
    ("/api/create-users/", {"count": "5", "prefix": "ok"}, "count"),
    ("/api/create-users/", {"count": 5, "prefix": 5}, "prefix"),
    ("/api/generate-report/", {"report_type": 1}, "report_type"),
    ("/api/generate-report/", {"report_type": "task_summary", "filters": {"since": 0}}, "since"),
    ("/api/generate-report/", {"report_type": "task_summary", "filters": {"task_name": 5}}, "task_name"),
    ("/api/revoke-task/{known}/", {"terminate": 1}, "terminate"),
    ("/api/revoke-task/{known}/", {"terminate": "true"}, "terminate"),
    # Huge numbers: out of bounds, or infinite once parsed.
    ("/api/simple-task/", {"x": 10**4000, "y": 1}, "x"),
    ("/api/chain-tasks/", {"value": 10**300}, "value"),
    ("/api/long-task/", {"total_steps": -(10**30)}, "total_steps"),
]


@pytest.mark.parametrize(
    ("path", "body", "field"), WRONG_TYPES, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(WRONG_TYPES)]
)
def test_a_value_of_the_wrong_type_is_a_422_naming_the_field(send, nothing_queued, path, body, field):
    detail = assert_error(send(path, json.dumps(body).encode()), 422)

    assert f'"{field}"' in json.dumps(detail), detail


def test_an_infinite_number_is_a_422(send, nothing_queued):
    # 1e400 parses as float("inf").
    detail = assert_error(send("/api/simple-task/", b'{"x": 1e400, "y": 1}'), 422)
    assert '"x"' in json.dumps(detail)
    detail = assert_error(send("/api/chord-tasks/", b'{"chunks": [[1, -1e400]]}'), 422)
    assert '"chunks"' in json.dumps(detail)


def test_an_integer_where_a_float_is_declared_is_accepted(api):
    response = api.post("/api/simple-task/", {"x": 2, "y": 3})

    assert response.status_code == 202, response.content


def test_a_whole_float_where_an_integer_is_declared_is_that_integer(api):
    # JSON has one number type; JSON Schema counts 3.0 as an integer.
    response = api.post("/api/chain-tasks/", {"value": 3.0})

    assert response.status_code == 202, response.content
    assert celery_app.backend.stored_meta(response.json()["task_ids"][0])["args"] == [3]


@pytest.mark.parametrize("path", [p for p in BODY_ENDPOINTS])
def test_an_unknown_field_is_a_422_naming_it(send, nothing_queued, path):
    body = {**BODY_ENDPOINTS[path], "fail_probabilty": 0.9}

    detail = assert_error(send(path, json.dumps(body).encode()), 422)

    assert detail[0]["type"] == "extra_forbidden"
    assert detail[0]["loc"][-1] == "fail_probabilty"


# --- Strings PostgreSQL and Redis cannot store ----------------------------------------------------

NUL_FIELDS = [
    ("/api/generate-report/", {"report_type": "task_summary", "filters": {"task_name": "a\u0000b"}}, "task_name"),
    ("/api/generate-report/", {"report_type": "task_summary\u0000"}, "report_type"),
    ("/api/generate-report/", {"report_type": "task_summary", "filters": {"since": "2026-01-01\u0000"}}, "since"),
    ("/api/create-users/", {"count": 1, "prefix": "ok\u0000"}, "prefix"),
    ("/api/simple-task/", {"x": 1, "y": 2, "operation": "add\u0000"}, "operation"),
    ("/api/long-task/", {"kind": "progress\u0000"}, "kind"),
]


@pytest.mark.parametrize(("path", "body", "field"), NUL_FIELDS, ids=[f"{p}-{f}" for p, _, f in NUL_FIELDS])
def test_a_nul_in_a_string_field_is_a_422_naming_the_field(send, nothing_queued, path, body, field):
    detail = assert_error(send(path, json.dumps(body).encode()), 422)

    assert f'"{field}"' in json.dumps(detail), detail


def test_the_report_filter_with_a_nul_says_why(send, nothing_queued):
    body = json.dumps({"report_type": "task_summary", "filters": {"task_name": "a\u0000b"}}).encode()

    detail = assert_error(send("/api/generate-report/", body), 422)

    assert detail[0]["loc"][-2:] == ["filters", "task_name"]
    assert "NUL" in detail[0]["msg"]


def test_a_lone_surrogate_in_a_string_field_is_a_422(send, nothing_queued):
    body = b'{"report_type": "task_summary", "filters": {"task_name": "a\\ud800b"}}'

    detail = assert_error(send("/api/generate-report/", body), 422)

    assert detail[0]["loc"][-1] == "task_name"
    assert "unicode" in detail[0]["msg"]


# --- Task ids ------------------------------------------------------------------------------------

BAD_TASK_IDS = {
    "NUL": "%00",
    "NUL inside": "a%00b",
    "space": "a%20b",
    "non-ASCII": "%C3%BC",
    "too long": "a" * 256,
    "dot first": ".hidden",
    "quote": "a%27b",
    "semicolon": "a;b",
    "percent": "a%25b",
    "backslash": "a%5Cb",
}


@pytest.mark.parametrize("task_id", BAD_TASK_IDS.values(), ids=BAD_TASK_IDS.keys())
@pytest.mark.parametrize("template", READ_ENDPOINTS)
def test_an_invalid_task_id_is_a_422_on_reads(client, api_token, template, task_id):
    response = client.get(template.format(id=task_id), headers={"Authorization": f"Bearer {api_token}"})

    detail = assert_error(response, 422)

    assert detail[0]["loc"] == ["path", "task_id"]


@pytest.mark.parametrize("task_id", BAD_TASK_IDS.values(), ids=BAD_TASK_IDS.keys())
def test_an_invalid_task_id_is_a_422_on_revoke(send, nothing_queued, task_id):
    detail = assert_error(send(f"/api/revoke-task/{task_id}/", b'{"terminate": true}'), 422)

    assert detail[0]["loc"] == ["path", "task_id"]


REAL_IDS = {
    "uuid": str(uuid.uuid4()),
    "uuid-hex": uuid.uuid4().hex,
    "report": "report:42",
    "celery-host": "celery@host.example",
    "punctuation": "a_b-c.d+e=f",
}


# Named, not listed: each pytest-xdist process collects the same test ids.
@pytest.mark.parametrize("task_id", REAL_IDS.values(), ids=REAL_IDS.keys())
def test_ids_of_the_accepted_form_are_looked_up(client, api_token, task_id):
    TaskLog.objects.create(task_id=task_id, task_name="app.tasks.add", state="SUCCESS", result=1)

    response = client.get(f"/api/task-status/{task_id}/", headers={"Authorization": f"Bearer {api_token}"})

    assert response.status_code == 200, response.content
    assert response.json()["task_id"] == task_id


# --- Every error under /api/ is JSON -------------------------------------------------------------


def test_an_unknown_api_path_is_a_json_404(client, api_token):
    response = client.get("/api/no-such-endpoint/", headers={"Authorization": f"Bearer {api_token}"})

    assert_error(response, 404)


def test_a_slash_in_a_task_id_is_a_json_404(client, api_token):
    response = client.get("/api/task-status/a%2Fb/", headers={"Authorization": f"Bearer {api_token}"})

    assert_error(response, 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("DELETE", "/api/simple-task/", "POST"), ("PUT", "/api/health/", "GET"), ("GET", "/api/revoke-task/x/", "POST")],
)
def test_a_method_not_allowed_is_a_json_405_with_allow(client, api_token, method, path, allowed):
    response = client.generic(method, path, headers={"Authorization": f"Bearer {api_token}"})

    assert response.status_code == 405
    assert _json_content_type(response) == "application/json"
    assert response["Allow"] == allowed
    assert response.json() == {"detail": "Method Not Allowed"}


def test_a_server_error_under_api_is_json_and_elsewhere_untouched(rf):
    from django.http import HttpResponseServerError

    from app.api_errors import ApiRequestGuard

    guard = ApiRequestGuard(lambda request: HttpResponseServerError("<h1>Server Error (500)</h1>"))

    api_response = guard(rf.get("/api/task-overview/"))
    admin_response = guard(rf.get("/admin/"))

    assert (api_response.status_code, api_response["Content-Type"]) == (500, "application/json")
    assert json.loads(api_response.content) == {"detail": "Internal Server Error"}
    assert admin_response.content == b"<h1>Server Error (500)</h1>"


@pytest.mark.parametrize("path", ALL_GET_PATHS)
def test_reads_with_a_token_still_answer(client, api_token, known_task, path):
    response = client.get(path.format(known=known_task), headers={"Authorization": f"Bearer {api_token}"})

    assert response.status_code == 200, response.content


HOSTILE = {
    "10 MB": (b'{"x": "' + b"a" * (10 * 1024 * 1024) + b'"}', "application/json"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    "NUL": (json.dumps({"x": "\u0000", "report_type": "\u0000", "value": "\u0000"}).encode(), "application/json"),
    "invalid UTF-8": (b'{"x": "\xff"}', "application/json"),
    "text/plain": (b'{"value": 1}', "text/plain"),
    "array of nulls": (b"[null, null]", "application/json"),
    "bool for numbers": (b'{"x": true, "y": false, "value": false, "count": true}', "application/json"),
}


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("body", HOSTILE.values(), ids=HOSTILE.keys())
def test_every_endpoint_answers_hostile_input_with_json_and_no_server_error(
    client, api_token, known_task, nothing_queued, method, body
):
    paths = client.get("/api/openapi.json", headers={"Authorization": f"Bearer {api_token}"}).json()["paths"]
    assert len(paths) == 15
    for path in paths:
        content, content_type = body
        response = client.generic(
            method,
            path.replace("{task_id}", known_task),
            content,
            content_type=content_type,
            headers={"Authorization": f"Bearer {api_token}"},
        )
        assert response.status_code < 500, (method, path, response.status_code, response.content[:300])
        assert _json_content_type(response) == "application/json", (method, path, response.content[:300])
        if method.lower() not in paths[path]:
            assert response.status_code in (405, 413, 415), (method, path, response.status_code)


# --- The OpenAPI schema lists every answer -----------------------------------------------------

BODY_STATUSES = {"400", "411", "413", "415", "422"}
REFUSED = {"401", "403"}
# 409: an idempotency key whose first request still runs.
ENQUEUE_STATUSES = {"202", "409", "503"} | REFUSED | BODY_STATUSES
EXPECTED_STATUSES = {
    ("post", "/api/revoke-task/{task_id}/"): {"202", "404", "503"} | REFUSED | BODY_STATUSES,
    ("get", "/api/task-status/{task_id}/"): {"200", "404", "422", "503"} | REFUSED,
    ("get", "/api/task-progress/{task_id}/"): {"200", "404", "422", "503"} | REFUSED,
    ("get", "/api/task-overview/"): {"200", "503"} | REFUSED,
    ("get", "/api/health/"): {"200", "503"},
}


def test_openapi_lists_every_status_each_endpoint_answers(client):
    schema = client.get("/api/openapi.json").json()
    enqueue_paths = [p for p in BODY_ENDPOINTS if "revoke" not in p]

    for path in enqueue_paths:
        assert set(schema["paths"][path]["post"]["responses"]) == ENQUEUE_STATUSES, path
    for (method, path), statuses in EXPECTED_STATUSES.items():
        assert set(schema["paths"][path][method]["responses"]) == statuses, path
    error = schema["paths"]["/api/simple-task/"]["post"]["responses"]["415"]["content"]["application/json"]
    assert error["schema"] == {"$ref": "#/components/schemas/ErrorOut"}
    (task_id,) = schema["paths"]["/api/task-status/{task_id}/"]["get"]["parameters"]
    assert task_id["in"] == "path"
    assert task_id["schema"]["pattern"] == schemas.TASK_ID_PATTERN
    assert task_id["schema"]["maxLength"] == 255
    assert schema["components"]["schemas"]["RevokeIn"]["additionalProperties"] is False


# --- Through a real gunicorn: what the test client cannot send ---------------------------------


def raw_request(base: str, request: bytes) -> tuple[int, dict, bytes]:
    """Send bytes as they are; returns (status, headers, body) of the answer."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(request)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_real_server_answers_hostile_bodies_with_json_and_queues_nothing(start_web, api_token):
    base = start_web(API_MAX_BODY_BYTES=4096)
    auth = f"Authorization: Bearer {api_token}\r\n"
    history = celery_app.backend.client.xlen(HISTORY_STREAM)
    messages = queued_messages()

    # A chunked body: Django reads no more than Content-Length, so it would be taken as empty.
    chunk = b'{"fail_probability": 0.9}'
    status, headers, body = raw_request(
        base,
        b"POST /api/retry-task/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth.encode() + b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n0\r\n\r\n",
    )
    assert (status, headers["content-type"]) == (411, "application/json"), body
    assert "Content-Length" in json.loads(body)["detail"]

    # 10 MB against the configured limit (4 KB here): read and thrown away, so that even a client
    # that sends its whole body before reading the answer (urllib) gets the 413.
    big = b'{"x": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    for path in ("/api/simple-task/", "/api/generate-report/"):
        headers = {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"}
        status, content = http("POST", base + path, big, headers)
        assert status == 413, content[:200]
        assert json.loads(content)["detail"].endswith("at most 4096 are accepted.")

    # 1 GB announced: answered from the headers, without reading the body.
    status, headers, body = raw_request(
        base,
        f"POST /api/simple-task/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {1024**3}\r\nConnection: close\r\n\r\n".encode()
        + b'{"x": "'
        + b"a" * 65536,
    )
    assert (status, headers["content-type"]) == (413, "application/json"), body[:200]

    # NUL in a task id, in the path as the client sends it.
    for method, path in [
        ("GET", "/api/task-status/%00/"),
        ("GET", "/api/task-progress/%00/"),
        ("POST", "/api/revoke-task/%00/"),
    ]:
        status, content = http(
            method,
            base + path,
            b"{}" if method == "POST" else None,
            {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"},
        )
        assert status == 422, (path, content[:200])
        assert json.loads(content)["detail"][0]["loc"] == ["path", "task_id"]

    # A Content-Type Django cannot parse (it raises while building the request, before any middleware).
    status, headers, body = raw_request(
        base,
        b"POST /api/chain-tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth.encode() + b"Content-Type: application/json; "
        b"charset*=bogus''x\r\nContent-Length: 12\r\nConnection: close\r\n\r\n" + b'{"value": 1}',
    )
    assert (status, headers["content-type"]) == (415, "application/json"), body

    # The report filter with a NUL, and a JSON body as text/plain.
    nul = json.dumps({"report_type": "task_summary", "filters": {"task_name": "a\u0000b"}}).encode()
    status, content = http(
        "POST",
        base + "/api/generate-report/",
        nul,
        {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"},
    )
    assert status == 422, content
    status, content = http(
        "POST",
        base + "/api/chain-tasks/",
        b'{"value": 1}',
        {"Authorization": f"Bearer {api_token}", "Content-Type": "text/plain"},
    )
    assert status == 415, content

    assert celery_app.backend.client.xlen(HISTORY_STREAM) == history
    assert queued_messages() == messages
    assert not Report.objects.exists()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_an_unreachable_database_is_a_json_503_and_queues_nothing(start_web, api_token):
    from tests.resources import free_port

    base = start_web(DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/unreachable")
    headers = {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"}
    history, messages = celery_app.backend.client.xlen(HISTORY_STREAM), queued_messages()

    status, content = http("GET", base + "/api/task-overview/", headers=headers)
    assert status == 503, content[:300]
    assert json.loads(content)["detail"].startswith("The database is unavailable")
    body = json.dumps({"report_type": "user_summary"}).encode()
    status, content = http("POST", base + "/api/generate-report/", body, headers)
    assert status == 503, content[:300]

    assert celery_app.backend.client.xlen(HISTORY_STREAM) == history
    assert queued_messages() == messages
