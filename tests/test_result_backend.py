"""The result backends (app/result_backend.py): each stored state and its history entry in one
step, against the real Redis and database."""

import json
import os
import subprocess
import sys
import time

import pytest
from celery import states
from celery.app.task import Context
from django_celery_results.models import TaskResult

from app import result_backend
from app.models import TaskLog, TaskState
from app.result_backend import HISTORY_STREAM, RedisStateBackend, UpsertDatabaseBackend
from app.signals import RUN_STARTED_AT, RUN_STARTED_WALL, SENT_AT_HEADER
from project.celery import app as celery_app
from tests.processes import REPO_ROOT
from tests.resources import empty_redis_db


@pytest.fixture
def backend():
    with empty_redis_db() as url:
        yield RedisStateBackend(app=celery_app, url=url)


def request(**fields):
    """A task request as the worker's pool process sees it."""
    defaults = {
        "id": "t",
        "task": "app.tasks.add",
        "args": [1, 2],
        "kwargs": {},
        "hostname": "w1@host",
        "retries": 0,
        "delivery_info": {"routing_key": "default"},
    }
    return Context({**defaults, **fields})


def history(backend) -> list[dict]:
    return [json.loads(fields[b"meta"]) for _id, fields in backend.client.xrange(HISTORY_STREAM)]


def test_a_stored_state_is_the_result_key_and_one_history_entry_alike(backend):
    run = request(
        **{SENT_AT_HEADER: time.time() - 1, RUN_STARTED_WALL: time.time(), RUN_STARTED_AT: time.perf_counter()}
    )

    backend.store_result("t1", 3, states.SUCCESS, request=run)

    stored = backend.client.get(backend.get_key_for_task("t1"))
    [entry] = backend.client.xrange(HISTORY_STREAM)
    assert entry[1][b"meta"] == stored
    meta = json.loads(stored)
    assert (meta["status"], meta["result"], meta["name"], meta["worker"], meta["queue"]) == (
        "SUCCESS",
        3,
        "app.tasks.add",
        "w1@host",
        "default",
    )
    assert meta["date_created"] < meta["date_started"] <= meta["date_done"]
    assert 0 <= meta["runtime"] < 5
    assert 0 < backend.client.ttl(backend.get_key_for_task("t1")) <= backend.expires


def test_a_stored_success_is_never_replaced_and_nothing_reaches_the_history(backend):
    backend.store_result("t2", 3, states.SUCCESS, request=request())
    # A lost worker's late failure (WorkerLostError after the child stored its result).
    backend.store_result("t2", RuntimeError("lost"), states.FAILURE, request=request())

    assert backend.get_task_meta("t2")["status"] == states.SUCCESS
    assert [meta["status"] for meta in history(backend)] == ["SUCCESS"]


def test_progress_is_live_state_only(backend):
    backend.store_result("t3", {"current": 1, "total": 4}, "PROGRESS", request=request())

    assert backend.stored_meta("t3")["result"] == {"current": 1, "total": 4}
    assert history(backend) == []


def test_a_retry_and_a_failure_reach_the_history_with_their_exception(backend):
    backend.store_result("t4", RuntimeError("flaky"), states.RETRY, traceback="tb", request=request())
    backend.store_result("t4", KeyError("sum"), states.FAILURE, traceback="tb2", request=request(retries=1))

    entries = history(backend)
    assert [(m["status"], m["result"]["exc_type"], m["retries"]) for m in entries] == [
        ("RETRY", "RuntimeError", 0),
        ("FAILURE", "KeyError", 1),
    ]


def test_queued_ids_are_stored_pending_unless_a_worker_was_faster(backend):
    backend.store_result("fast", 3, states.SUCCESS, request=request())
    metas = [
        result_backend.queued_meta(task_id=task_id, task_name="app.tasks.add", args=[1, 2], kwargs={}, queue="default")
        for task_id in ("q1", "q2", "fast")
    ]

    assert backend.record_queued(metas) == 2

    assert backend.stored_meta("q1")["status"] == states.PENDING
    assert backend.stored_meta("fast")["status"] == states.SUCCESS
    assert [(m["task_id"], m["status"]) for m in history(backend)] == [
        ("fast", "SUCCESS"),
        ("q1", "PENDING"),
        ("q2", "PENDING"),
    ]


def test_an_id_never_handed_out_has_no_stored_state(backend):
    assert backend.stored_meta("never") is None
    assert backend.get_task_meta("never")["status"] == states.PENDING  # Celery's own answer for any id


def test_publishing_does_not_subscribe_to_the_result_channel():
    backend = celery_app.backend
    result = celery_app.send_task("app.tasks.add", args=[1, 2], queue="test-nobody-consumes")
    try:
        key = backend.get_key_for_task(result.id)
        # Stock Celery subscribes here, at publish time; nobody in the web waits for results.
        assert backend.client.pubsub_numsub(key) == [(key, 0)]
    finally:
        backend.client.delete("test-nobody-consumes")


def test_a_serializer_the_script_cannot_read_is_refused():
    with pytest.raises(ValueError, match="JSON"):
        RedisStateBackend(app=celery_app, url="redis://127.0.0.1:1/0", serializer="pickle")


# --- The database backend (RESULT_BACKEND_URL=django-db) -----------------------------------------


@pytest.mark.django_db
def test_the_database_backend_keeps_one_row_per_task_and_its_history_in_the_same_transaction():
    backend = UpsertDatabaseBackend(app=celery_app)
    run = request(id="db-1", **{RUN_STARTED_WALL: time.time(), RUN_STARTED_AT: time.perf_counter()})

    backend.store_result("db-1", None, states.STARTED, request=run)
    started_at = TaskResult.objects.get(task_id="db-1").date_started
    backend.store_result("db-1", {"answer": 42}, states.SUCCESS, request=run)

    row = TaskResult.objects.get(task_id="db-1")
    assert (row.status, row.date_started) == ("SUCCESS", started_at)
    assert row.date_done >= started_at
    assert backend.get_task_meta("db-1")["result"] == {"answer": 42}
    log = TaskLog.objects.get(task_id="db-1")
    assert (log.state, log.result, log.worker, log.duration is not None) == (
        TaskState.SUCCESS,
        {"answer": 42},
        "w1@host",
        True,
    )


@pytest.mark.django_db
def test_the_database_backend_records_queued_ids_without_overwriting_a_stored_state():
    backend = UpsertDatabaseBackend(app=celery_app)
    backend.store_result("db-fast", 5, states.SUCCESS, request=request(id="db-fast"))
    metas = [
        result_backend.queued_meta(task_id=task_id, task_name="app.tasks.add", args=[2, 3], kwargs={}, queue="default")
        for task_id in ("db-q", "db-fast")
    ]

    backend.record_queued(metas)

    assert backend.stored_meta("db-q")["status"] == states.PENDING
    assert backend.stored_meta("db-fast")["status"] == states.SUCCESS
    assert backend.stored_meta("db-never") is None
    assert dict(TaskLog.objects.values_list("task_id", "state")) == {"db-q": "PENDING", "db-fast": "SUCCESS"}


# --- Which backend the settings choose ----------------------------------------------------------------


SHOW_BACKEND = (
    "import django; django.setup(); from django.conf import settings as s; "
    "from project.celery import app; print(s.CELERY_RESULT_BACKEND); print(type(app.backend).__name__)"
)


def backend_for(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RESULT_BACKEND_URL", "CELERY_BROKER_URL")}
    return subprocess.run(
        [sys.executable, "-c", SHOW_BACKEND],
        cwd=REPO_ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "project.settings", **env},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CELERY_BROKER_URL": "redis://cache:6379/2"}, "RedisStateBackend+redis://cache:6379/2"),
        ({"CELERY_BROKER_URL": "amqp://guest@mq//"}, "UpsertDatabaseBackend"),
        (
            {
                "CELERY_BROKER_URL": "amqp://guest@mq//",
                "RESULT_BACKEND_URL": "rediss://results:6380/0?ssl_cert_reqs=required",
            },
            "RedisStateBackend+rediss://results:6380/0?ssl_cert_reqs=required",
        ),
        ({"CELERY_BROKER_URL": "redis://cache:6379/2", "RESULT_BACKEND_URL": "django-db"}, "UpsertDatabaseBackend"),
    ],
)
@pytest.mark.subprocess
def test_the_result_backend_follows_the_broker_unless_set(env, expected):
    result = backend_for(**env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].endswith(expected)


@pytest.mark.subprocess
def test_celery_result_backend_in_the_environment_is_refused_with_a_clear_error():
    result = backend_for(CELERY_RESULT_BACKEND="redis://cache:6379/0")

    assert result.returncode != 0
    assert "Set RESULT_BACKEND_URL, not CELERY_RESULT_BACKEND" in result.stderr


@pytest.mark.subprocess
def test_an_unknown_result_backend_is_refused_with_a_clear_error():
    result = backend_for(RESULT_BACKEND_URL="memcached://x")

    assert result.returncode != 0
    assert "RESULT_BACKEND_URL must be a redis://, rediss:// or sentinel:// URL, or django-db" in result.stderr
