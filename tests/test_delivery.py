"""At-least-once delivery under faults, with a real prefork worker on a real Redis broker: a
retry that cannot be published requeues the task instead of dropping it (app/task_class.py),
and a task whose pool process dies on every run ends after max_retries instead of looping
(retry_on_worker_lost, app/tasks.py IDEMPOTENT)."""

import json
import os
import signal
import subprocess
import time
import uuid

import pytest
import redis
from celery import chord

from app.lost_tasks import LostRuns
from app.result_backend import RedisStateBackend
from tests.conftest import celery_app_for, wait_until
from tests.processes import REPO_ROOT, new_hostname, start_worker, subprocess_env, worker_command

pytestmark = pytest.mark.integration


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


def test_an_at_most_once_task_whose_message_comes_twice_runs_once(faulty_worker, redis_url):
    # As when its acknowledgement was lost while the broker restarted: Redis gives the message
    # back after the visibility timeout, with the same task id and retry count.
    app, worker = faulty_worker
    key, task_id = f"runs-{uuid.uuid4().hex}", str(uuid.uuid4())

    app.send_task("faulty.count_at_most_once", args=[key], task_id=task_id, queue="default")
    assert final_state(redis_url, task_id, worker)["status"] == "SUCCESS"
    app.send_task("faulty.count_at_most_once", args=[key], task_id=task_id, queue="default")
    wait_until(lambda: "ran already: not run again" in worker.log(), timeout=30, message="the second delivery")

    assert int(redis.Redis.from_url(redis_url).get(key)) == 1
    assert stored(redis_url, task_id)["status"] == "SUCCESS"


def test_an_at_most_once_run_is_recorded_until_it_ends(faulty_worker, redis_url):
    app, worker = faulty_worker
    backend = RedisStateBackend(app=app, url=redis_url)

    result = app.send_task("faulty.sleep_at_most_once", args=[f"runs-{uuid.uuid4().hex}", 1], queue="default")
    running = wait_until(backend.runs, timeout=30, message="the run recorded")
    assert [(run["task_id"], run["retries"], run["pid"]) for run in running] == [(result.id, 0, worker.process.pid)]

    assert final_state(redis_url, result.id, worker)["status"] == "SUCCESS"
    wait_until(lambda: not backend.runs(), timeout=10, message="the record removed after the run")


def test_an_at_most_once_task_whose_worker_dies_as_it_starts_is_stored_as_failure(faulty_worker, redis_url):
    # No event of the worker may have left it (they are buffered): beat judges by the recorded run.
    app, worker = faulty_worker
    backend = RedisStateBackend(app=app, url=redis_url)
    key = f"runs-{uuid.uuid4().hex}"
    result = app.send_task("faulty.sleep_at_most_once", args=[key, 60], queue="default")
    wait_until(lambda: redis.Redis.from_url(redis_url).get(key), timeout=30, message="the run started")
    os.killpg(worker.process.pid, signal.SIGKILL)  # the pod dies: main process and pool children
    worker.process.wait()

    lost_runs = LostRuns(backend, lost_after=1)
    lost_runs.listening()
    time.sleep(1.1)  # listening for lost_after, and nothing heard from the worker

    assert lost_runs.sweep() == 1
    meta = stored(redis_url, result.id)
    assert (meta["status"], meta["result"]["exc_type"]) == ("FAILURE", "WorkerLostError")
    assert backend.runs() == []
    assert int(redis.Redis.from_url(redis_url).get(key)) == 1  # never run again


def test_a_chord_completes_when_a_header_tasks_process_dies_after_storing_its_success(faulty_worker, redis_url):
    # Celery would acknowledge the stored success and never count the task in its chord.
    _, worker = faulty_worker
    app = celery_app_for(redis_url, result_backend=f"app.result_backend:RedisStateBackend+{redis_url}")
    part_key, callback_key = f"runs-{uuid.uuid4().hex}", f"runs-{uuid.uuid4().hex}"
    header = [
        app.signature("faulty.dies_after_storing_success", args=[part_key], queue="default"),
        app.signature("faulty.count_at_most_once", args=[f"runs-{uuid.uuid4().hex}"], queue="default"),
    ]
    callback = app.signature("faulty.chord_callback", args=[callback_key], queue="default")

    result = chord(header, app=app)(callback)

    meta = final_state(redis_url, result.id, worker)
    # The header task's second run reached the chord (its first stored SUCCESS and died).
    assert (meta["status"], meta["result"]) == ("SUCCESS", [2, 1]), worker.log()[-3000:]
    assert int(redis.Redis.from_url(redis_url).get(part_key)) == 2  # the second run counted it
    assert int(redis.Redis.from_url(redis_url).get(callback_key)) == 1
    assert "succeeded before the worker was lost" not in worker.log()


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


# --- Redelivery after a worker dies (Redis): app/redelivery.py -----------------------------------

# A default pool with short limits, so its derived visibility timeout is short: 4 s hard limit
# + 1 s longest countdown + 5 s margin = 10 s; restore sweeps every second.
SHORT_POOL = {
    "CELERY_TASK_TIME_LIMIT": "4",
    "CELERY_TASK_SOFT_TIME_LIMIT": "3",
    "CELERY_RETRY_BACKOFF_MAX": "1",
    "REDIS_RESTORE_INTERVAL": "1",
}
SHORT_POOL_VISIBILITY_TIMEOUT = 10


def pool_worker(app, redis_url, log_dir, *, pool: str, queues: str, **env):
    return start_worker(
        app,
        broker_url=redis_url,
        log_dir=log_dir,
        app_module="tests.apps.faulty_tasks",
        queues=queues,
        RESULT_BACKEND_URL=redis_url,
        RUNS_URL=redis_url,
        TASK_HISTORY_RECORDER="false",
        WORKER_POOL_NAME=pool,
        **env,
    )


def run_starts(redis_url: str, key: str) -> list[float]:
    return [float(value) for value in redis.Redis.from_url(redis_url).lrange(f"{key}:started", 0, -1)]


def test_a_task_held_by_a_killed_worker_runs_again_within_the_pools_visibility_timeout(redis_url, service_log_dir):
    app = celery_app_for(redis_url)
    pool = f"short-{uuid.uuid4().hex[:6]}"
    first = pool_worker(app, redis_url, service_log_dir, pool=pool, queues="default", **SHORT_POOL)
    key = f"runs-{uuid.uuid4().hex}"
    try:
        result = app.send_task("faulty.slow_at_least_once", args=[key, 2.5], queue="default")
        wait_until(lambda: run_starts(redis_url, key), timeout=30, message="the first run started")
        os.killpg(first.process.pid, signal.SIGKILL)  # main process and pool children, mid-run
        killed_at = time.time()
        first.process.wait()
    finally:
        first.stop()
    client = redis.Redis.from_url(redis_url)
    assert client.hlen(f"unacked:{pool}") == 1  # held, unacknowledged, in the pool's own keys

    second = pool_worker(app, redis_url, service_log_dir, pool=pool, queues="default", **SHORT_POOL)
    try:
        meta = final_state(redis_url, result.id, second)
    finally:
        second.stop()

    assert (meta["status"], meta["result"]) == ("SUCCESS", 2)
    delay = run_starts(redis_url, key)[1] - killed_at
    # Not before the visibility timeout (the first worker might have been alive), and within
    # one restore sweep (1 s) and a worker start after it.
    assert SHORT_POOL_VISIBILITY_TIMEOUT - 3 <= delay <= SHORT_POOL_VISIBILITY_TIMEOUT + 6, delay
    assert "visibility_timeout" not in second.log()  # derived, not refused


def test_a_short_pool_never_redelivers_a_long_pools_running_task(redis_url, service_log_dir):
    app = celery_app_for(redis_url)
    long_pool = pool_worker(app, redis_url, service_log_dir, pool=f"long-{uuid.uuid4().hex[:6]}", queues="long")
    short_pool = pool_worker(
        app, redis_url, service_log_dir, pool=f"short-{uuid.uuid4().hex[:6]}", queues="default", **SHORT_POOL
    )
    key = f"runs-{uuid.uuid4().hex}"
    try:
        # Runs past the short pool's visibility timeout (10 s) and several of its restore sweeps.
        result = app.send_task("faulty.slow_on_long", args=[key, SHORT_POOL_VISIBILITY_TIMEOUT + 4], queue="long")
        meta = final_state(redis_url, result.id, long_pool)
    finally:
        short_pool.stop()
        long_pool.stop()

    assert (meta["status"], meta["result"]) == ("SUCCESS", 1)
    assert len(run_starts(redis_url, key)) == 1  # never handed out a second time


def test_a_worker_refuses_a_visibility_timeout_set_shorter_than_its_tasks_need(redis_url):
    run = subprocess.run(
        worker_command(hostname=new_hostname(), queues="default", pool="solo", purge=False),
        cwd=REPO_ROOT,
        env=subprocess_env(CELERY_BROKER_URL=redis_url, CELERY_BROKER_VISIBILITY_TIMEOUT="20"),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert run.returncode != 0
    assert "visibility timeout (20 s) must exceed 45 s" in run.stderr + run.stdout
