"""The history recorder (app/history_recorder.py): the Redis stream folded into TaskLog,
nothing lost or doubled when the recorder or a pool process is killed. Real Redis, real
database, real workers."""

import json
import os
import signal
import sys
import time
import uuid

import pytest
import redis
from celery import states
from celery.app.task import Context

from app import history_recorder, task_history
from app.history_recorder import GROUP, HistoryRecorder, RecorderSettings
from app.models import TaskLog, TaskState
from app.result_backend import HISTORY_STREAM, RedisStateBackend
from tests.apps.dies_after_storing import DIE_AFTER_STORING
from tests.conftest import celery_app_for, wait_until
from tests.processes import Service, start_worker, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def backend(redis_url):
    from project.celery import app

    return RedisStateBackend(app=app, url=redis_url)


def recorder(backend, **settings) -> HistoryRecorder:
    return HistoryRecorder(
        client=backend.client,
        stream=HISTORY_STREAM,
        settings=RecorderSettings(**{"block_seconds": 0.05, **settings}),
        consumer=f"test-{uuid.uuid4().hex[:6]}",
    )


def store_success(backend, task_id: str, result=3) -> None:
    backend.store_result(
        task_id, result, states.SUCCESS, request=Context(id=task_id, task="app.tasks.add", args=[1, 2])
    )


def test_a_batch_is_written_then_acknowledged_and_deleted_from_the_stream(backend):
    for i in range(5):
        store_success(backend, f"r{i}", result=i)

    assert recorder(backend).step() == 5

    assert dict(TaskLog.objects.values_list("task_id", "result")) == {f"r{i}": i for i in range(5)}
    assert backend.client.xlen(HISTORY_STREAM) == 0
    assert history_recorder.backlog(backend.client, HISTORY_STREAM) == 0


def test_a_batch_whose_database_write_fails_stays_pending_and_is_written_next_time(backend, monkeypatch):
    store_success(backend, "r-fail")
    rec = recorder(backend)
    real_apply = task_history.apply

    def database_down(entries):
        raise ConnectionError("database down")

    monkeypatch.setattr(task_history, "apply", database_down)
    with pytest.raises(ConnectionError):
        rec.step()
    assert history_recorder.backlog(backend.client, HISTORY_STREAM) == 1
    rec._own_pending = True  # what run() does after an error

    monkeypatch.setattr(task_history, "apply", real_apply)
    assert rec.step() == 1

    assert TaskLog.objects.get(task_id="r-fail").state == TaskState.SUCCESS
    assert history_recorder.backlog(backend.client, HISTORY_STREAM) == 0


def test_entries_a_stopped_recorder_had_read_are_taken_over_after_the_claim_time(backend):
    store_success(backend, "r-orphan")
    dead = recorder(backend)
    dead.read_batch()  # read, never acknowledged: then the process died
    assert TaskLog.objects.count() == 0

    live = recorder(backend, claim_idle_seconds=0.2)
    assert live.step() == 0 or TaskLog.objects.exists()  # too early: the entry is not idle yet
    time.sleep(0.3)
    wait_until(lambda: live.step() or TaskLog.objects.exists(), timeout=5, message="the orphan entry claimed")

    assert TaskLog.objects.get(task_id="r-orphan").state == TaskState.SUCCESS
    assert history_recorder.backlog(backend.client, HISTORY_STREAM) == 0


def test_an_entry_that_is_not_a_task_state_is_skipped_and_does_not_block_the_rest(backend):
    backend.client.xadd(HISTORY_STREAM, {"meta": b"not json"})
    store_success(backend, "r-after")

    assert recorder(backend).step() == 2

    assert list(TaskLog.objects.values_list("task_id", flat=True)) == ["r-after"]
    assert backend.client.xlen(HISTORY_STREAM) == 0


def test_states_stored_before_any_recorder_ran_are_recorded(backend):
    store_success(backend, "r-early")  # the stream exists, the consumer group does not yet

    recorder(backend).step()

    assert TaskLog.objects.filter(task_id="r-early").exists()


# --- Killed mid-stream, with real workers ----------------------------------------------------------


def start_recorder(name: str, redis_url: str, log_dir, **env) -> Service:
    command = [sys.executable, "manage.py", "record_task_history", "--consumer", name]
    return Service(
        f"recorder-{name}-{uuid.uuid4().hex[:4]}",
        command,
        subprocess_env(RESULT_BACKEND_URL=redis_url, TASK_HISTORY_BATCH_SIZE=40, **env),
        log_dir,
    )


def kill_while_holding_a_batch(service: Service, client, consumer: str) -> None:
    """SIGKILL the recorder at a moment it has read entries and not acknowledged them."""

    def holding() -> bool:
        return any(
            c["name"].decode() == consumer and c["pending"] for c in client.xinfo_consumers(HISTORY_STREAM, GROUP)
        )

    wait_until(holding, timeout=60, interval=0.002, message=f"recorder {consumer} holding a batch")
    os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait()
    service.stop()


def final_rows(task_ids) -> dict[str, TaskLog]:
    return {
        log.task_id: log
        for log in TaskLog.objects.filter(task_id__in=task_ids, state__in=[TaskState.SUCCESS, TaskState.FAILURE])
    }


@pytest.mark.integration
def test_killing_the_recorder_mid_stream_loses_and_doubles_nothing(redis_url, service_log_dir):
    app = celery_app_for(redis_url, result_backend=f"app.result_backend:RedisStateBackend+{redis_url}")
    worker = start_worker(app, broker_url=redis_url, log_dir=service_log_dir, RESULT_BACKEND_URL=redis_url)
    first = start_recorder("a", redis_url, service_log_dir)
    try:
        with app.producer_or_acquire() as producer:
            adds = [app.send_task("app.tasks.add", args=[i, 1], producer=producer).id for i in range(1200)]
            failing = [
                app.send_task("app.tasks.aggregate_results", args=[[{"bad": i}]], producer=producer).id
                for i in range(60)
            ]
            retried = [
                app.send_task(
                    "app.tasks.task_with_retry", kwargs={"fail_probability": 0, "fail_times": 1}, producer=producer
                ).id
                for _ in range(20)
            ]
        every = adds + failing + retried

        # Killed while workers run at full speed, with part of the stream written.
        client = redis.Redis.from_url(redis_url)
        wait_until(lambda: 100 < TaskLog.objects.count(), timeout=60, interval=0.01, message="some history")
        kill_while_holding_a_batch(first, client, "a")
        second = start_recorder("a", redis_url, service_log_dir)  # same name: re-reads its pending entries
        wait_until(lambda: "Reading again" in second.log(), timeout=60, message="a's pending entries read again")
        written = TaskLog.objects.count()
        wait_until(lambda: TaskLog.objects.count() > written, timeout=60, interval=0.01, message="more history")
        kill_while_holding_a_batch(second, client, "a")
        # Another name: the entries "a" read and never acknowledged are claimed once idle.
        third = start_recorder("b", redis_url, service_log_dir, TASK_HISTORY_CLAIM_IDLE_SECONDS=1)
        try:
            rows = wait_until(
                lambda: (r := final_rows(every)) and len(r) == len(every) and r,
                timeout=120,
                interval=0.5,
                message=f"all {len(every)} tasks in TaskLog",
            )
        finally:
            third.stop()
    finally:
        worker.stop()

    assert "Reading again" in second.log()
    assert "Claimed" in third.log()
    assert TaskLog.objects.count() == len(every)
    assert {rows[t].result for t in adds} == {i + 1 for i in range(1200)}
    assert all(rows[t].state == TaskState.SUCCESS and rows[t].finished_at and rows[t].duration for t in adds)
    assert all(rows[t].state == TaskState.FAILURE and rows[t].exception.startswith("KeyError") for t in failing)
    assert all(rows[t].traceback for t in failing)
    assert {(rows[t].state, rows[t].retries) for t in retried} == {(TaskState.SUCCESS, 1)}
    assert history_recorder.backlog(client, HISTORY_STREAM) == 0


@pytest.mark.integration
def test_a_pool_process_killed_right_after_storing_its_result_keeps_it_in_the_history(redis_url, service_log_dir):
    app = celery_app_for(redis_url, result_backend=f"app.result_backend:RedisStateBackend+{redis_url}")
    worker = start_worker(
        app,
        broker_url=redis_url,
        log_dir=service_log_dir,
        app_module="tests.apps.dies_after_storing",
        RESULT_BACKEND_URL=redis_url,
    )
    recorder_service = start_recorder("c", redis_url, service_log_dir)
    try:
        at_least_once = app.send_task("app.tasks.add", args=[2, 3], task_id=f"{DIE_AFTER_STORING}{uuid.uuid4()}")
        at_most_once = app.send_task("app.tasks.debug_task", task_id=f"{DIE_AFTER_STORING}{uuid.uuid4()}")
        after = app.send_task("app.tasks.add", args=[5, 5])

        rows = wait_until(
            lambda: (r := final_rows([at_least_once.id, at_most_once.id, after.id])) and len(r) == 3 and r,
            timeout=60,
            message="the three tasks in TaskLog",
        )
    finally:
        recorder_service.stop()
        worker.stop()

    assert "succeeded before the worker was lost" in worker.log()
    assert (rows[at_least_once.id].state, rows[at_least_once.id].result) == (TaskState.SUCCESS, 5)
    assert rows[at_most_once.id].state == TaskState.SUCCESS
    assert rows[after.id].result == 10
    # Stored once each: the killed runs were not run again nor recorded as failures.
    client = redis.Redis.from_url(redis_url)
    assert json.loads(client.get(f"celery-task-meta-{at_least_once.id}"))["status"] == "SUCCESS"
    assert "WorkerLostError" not in "".join(TaskLog.objects.values_list("exception", flat=True))
