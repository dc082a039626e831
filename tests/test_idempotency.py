"""Idempotency keys on the enqueue endpoints (app/idempotency.py), through the API with the
real broker: a retry with the same key and body gets the first answer and queues nothing."""

import datetime as dt
import json

import pytest
from django.utils import timezone
from kombu.exceptions import OperationalError

from app import services, workflows
from app.models import IdempotencyKey
from tests.conftest import make_api_token
from tests.test_api import history_length

pytestmark = pytest.mark.django_db

SIMPLE = "/api/simple-task/"


def test_a_retry_with_the_same_key_and_body_gets_the_first_answer_and_queues_nothing(api):
    first = api.post(SIMPLE, {"x": 1, "y": 2}, headers={"Idempotency-Key": "order-1"})
    queued = history_length()
    # The same request: other key order, a default spelled out.
    again = api.post(SIMPLE, {"y": 2, "operation": "add", "x": 1}, headers={"Idempotency-Key": "order-1"})

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert history_length() == queued


def test_the_same_key_with_another_body_or_endpoint_is_a_422_and_queues_nothing(api):
    assert api.post(SIMPLE, {"x": 1, "y": 2}, headers={"Idempotency-Key": "k"}).status_code == 202
    queued = history_length()

    other_body = api.post(SIMPLE, {"x": 1, "y": 3}, headers={"Idempotency-Key": "k"})
    other_endpoint = api.post("/api/chain-tasks/", {"value": 1}, headers={"Idempotency-Key": "k"})

    assert (other_body.status_code, other_endpoint.status_code) == (422, 422)
    assert "was used with another request" in other_body.json()["detail"]
    assert history_length() == queued


def test_keys_belong_to_the_token_holder(api):
    mine = api.post(SIMPLE, {"x": 1, "y": 2}, headers={"Idempotency-Key": "shared"})
    theirs = api.post(SIMPLE, {"x": 1, "y": 2}, token=make_api_token("enqueue"), headers={"Idempotency-Key": "shared"})

    assert (mine.status_code, theirs.status_code) == (202, 202)
    assert mine.json()["task_id"] != theirs.json()["task_id"]


def test_requests_without_a_key_are_never_deduplicated(api):
    ids = {api.post(SIMPLE, {"x": 1, "y": 2}).json()["task_id"] for _ in range(2)}

    assert len(ids) == 2
    assert not IdempotencyKey.objects.exists()


def test_a_request_that_queued_nothing_gives_its_key_back(api, monkeypatch):
    def broker_down(**_):
        raise OperationalError("connection refused")

    with monkeypatch.context() as patched:
        patched.setattr(workflows, "start_simple", broker_down)
        assert api.post(SIMPLE, {"x": 1, "y": 2}, headers={"Idempotency-Key": "retry-me"}).status_code == 503
    assert not IdempotencyKey.objects.exists()

    retried = api.post(SIMPLE, {"x": 1, "y": 2}, headers={"Idempotency-Key": "retry-me"})
    assert retried.status_code == 202
    assert "Idempotent-Replayed" not in retried.headers


def test_a_key_whose_request_still_runs_is_a_409_until_it_is_abandoned(api, api_token):
    from app import api_tokens

    grant = api_tokens.grant_for(api_tokens.ApiToken.digest_of(api_token))
    body = {"x": 1, "y": 2}
    first = api.post(SIMPLE, body, headers={"Idempotency-Key": "slow"})
    row = IdempotencyKey.objects.get()
    assert row.holder == grant.holder
    row.response = None  # as while the first request is still queueing
    row.save()

    running = api.post(SIMPLE, body, headers={"Idempotency-Key": "slow"})
    assert running.status_code == 409
    assert "still running" in running.json()["detail"]

    IdempotencyKey.objects.update(created_at=timezone.now() - services.IDEMPOTENCY_ABANDONED_AFTER - dt.timedelta(1))
    taken_over = api.post(SIMPLE, body, headers={"Idempotency-Key": "slow"})
    assert taken_over.status_code == 202
    assert taken_over.json()["task_id"] != first.json()["task_id"]


def test_an_expired_key_runs_the_request_again(api):
    first = api.post(SIMPLE, {"x": 1, "y": 2}, headers={"Idempotency-Key": "old"})
    IdempotencyKey.objects.update(expires_at=timezone.now())

    again = api.post(SIMPLE, {"x": 1, "y": 2}, headers={"Idempotency-Key": "old"})

    assert again.status_code == 202
    assert again.json()["task_id"] != first.json()["task_id"]


@pytest.mark.parametrize("key", ["has space", "x" * 256, "tab\there", "é"])
def test_a_malformed_key_is_a_422_and_queues_nothing(api, key):
    queued = history_length()

    response = api.post(SIMPLE, {"x": 1, "y": 2}, headers={"Idempotency-Key": key})

    assert response.status_code == 422
    assert history_length() == queued
    assert not IdempotencyKey.objects.exists()


def test_expired_keys_are_deleted_and_live_ones_kept():
    now = timezone.now()
    for key, expires_at in [("gone", now - dt.timedelta(seconds=1)), ("kept", now + dt.timedelta(hours=1))]:
        IdempotencyKey.objects.create(holder="user:1", key=key, fingerprint="f", expires_at=expires_at)

    assert services.delete_expired_idempotency_keys() == 1
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["kept"]


def test_the_schema_documents_the_header_and_its_answers(api):
    schema = api.get("/api/openapi.json").json()

    for path, operations in schema["paths"].items():
        operation = operations.get("post")
        if not operation or path.startswith("/api/revoke-task/"):
            continue
        [header] = [p for p in operation.get("parameters", []) if p["in"] == "header"]
        assert header["name"] == "Idempotency-Key", path
        assert header["required"] is False
        assert {"202", "409", "422"} <= set(operation["responses"]), path
        assert json.dumps(header["schema"]).count("pattern") >= 1
