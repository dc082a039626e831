"""At-least-once delivery under faults, with a real prefork worker on a real Redis broker: a
retry that cannot be published requeues the task instead of dropping it (app/task_class.py),
and a task whose pool process dies on every run ends after max_retries instead of looping
(retry_on_worker_lost, app/tasks.py IDEMPOTENT)."""

import json
import os
import uuid

import pytest
import redis

from tests.conftest import celery_app_for, start_worker, wait_until

pytestmark = pytest.mark.integration

DELIVERY_TEST_DB = 7  # the suite's broker and results use 13 (tests/embedded_services.py)


@pytest.fixture
def redis_url() -> str:
    url = f"{os.environ['REDIS_URL'].rstrip('/')}/{DELIVERY_TEST_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def faulty_worker(redis_url, service_log_dir):
    app = celery_app_for(redis_url)
    worker = start_worker(
        app,
        broker_url=redis_url,
        log_dir=service_log_dir,
        app_module="tests.apps.faulty_tasks",
        RESULT_BACKEND_URL=redis_url,
        RUNS_URL=redis_url,
        TASK_HISTORY_RECORDER="false",
    )
    yield app, worker
    worker.stop()


def stored(redis_url: str, task_id: str) -> dict | None:
    raw = redis.Redis.from_url(redis_url).get(f"celery-task-meta-{task_id}")
    return json.loads(raw) if raw else None


def final_state(redis_url: str, task_id: str, worker) -> dict:
    return wait_until(
        lambda: (meta := stored(redis_url, task_id)) and meta["status"] in ("SUCCESS", "FAILURE") and meta,
        timeout=60,
        message=f"a final state for {task_id}:\n{worker.log()[-3000:]}",
    )


def test_an_at_least_once_task_whose_retry_cannot_be_published_runs_again(faulty_worker, redis_url):
    app, worker = faulty_worker
    key = f"runs-{uuid.uuid4().hex}"

    result = app.send_task("faulty.retry_at_least_once", args=[key], queue="default")

    meta = final_state(redis_url, result.id, worker)
    assert (meta["status"], meta["result"]) == ("SUCCESS", 2)  # requeued, then run again
    assert int(redis.Redis.from_url(redis_url).get(key)) == 2


def test_an_at_most_once_task_whose_retry_cannot_be_published_fails(faulty_worker, redis_url):
    app, worker = faulty_worker
    key = f"runs-{uuid.uuid4().hex}"

    result = app.send_task("faulty.retry_at_most_once", args=[key], queue="default")

    meta = final_state(redis_url, result.id, worker)
    assert meta["status"] == "FAILURE"  # Celery's behaviour: its message was acknowledged on receipt
    assert meta["result"]["exc_type"] == "Reject"
    assert int(redis.Redis.from_url(redis_url).get(key)) == 1


def test_a_task_whose_process_dies_on_every_run_fails_after_max_retries(faulty_worker, redis_url):
    app, worker = faulty_worker
    key = f"runs-{uuid.uuid4().hex}"

    result = app.send_task("faulty.kills_its_process", args=[key], queue="default")

    meta = final_state(redis_url, result.id, worker)
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "WorkerLostError"
    assert meta["retries"] == 3  # Celery's default max_retries: four runs, then the end
    assert int(redis.Redis.from_url(redis_url).get(key)) == 4
    assert worker.process.poll() is None  # the worker itself lives on
