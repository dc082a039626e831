"""At-most-once runs (app/lost_tasks.py): each attempt is claimed once, and the runs of a worker
that stopped are stored as FAILURE, with both real result backends (Redis and the database);
the clocks are fake ones."""

import time
import uuid

import pytest

from app.lost_tasks import SWEEP_INTERVAL, LostRuns
from app.result_backend import RedisStateBackend, UpsertDatabaseBackend
from project.celery import app as celery_app
from tests.resources import empty_redis_db

pytestmark = pytest.mark.django_db(transaction=True)

LOST_AFTER = 60


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["redis", "database"])
def backend(request):
    if request.param == "database":
        yield UpsertDatabaseBackend(app=celery_app)
        return
    with empty_redis_db() as url:
        yield RedisStateBackend(app=celery_app, url=url)


@pytest.fixture
def lost_runs(backend):
    """Beat's side, listening to the worker events since long enough to judge."""
    lost_runs = LostRuns(backend, lost_after=LOST_AFTER, clock=Clock(1000.0), wall_clock=Clock(time.time()))
    lost_runs.listening()
    lost_runs.clock.advance(LOST_AFTER)
    return lost_runs


def heard(lost_runs: LostRuns, hostname: str, pid: int, kind: str = "worker-heartbeat") -> None:
    lost_runs.event({"type": kind, "hostname": hostname, "pid": pid})


def later(lost_runs: LostRuns, seconds: float) -> None:
    lost_runs.clock.advance(seconds)
    lost_runs.wall_clock.advance(seconds)


def start(backend, hostname: str = "w1@host", pid: int = 100, retries: int = 0, task_id: str | None = None) -> str:
    task_id = task_id or str(uuid.uuid4())
    run = {"task_id": task_id, "retries": retries, "name": "app.tasks.debug_task", "hostname": hostname, "pid": pid}
    assert backend.claim_run({**run, "started": time.time()})
    return task_id


def test_an_attempt_is_claimed_once_and_a_retry_is_a_new_attempt(backend):
    task_id = start(backend)
    run = {"task_id": task_id, "retries": 0, "name": "t", "hostname": "w2@host", "pid": 7, "started": time.time()}

    assert not backend.claim_run(run)  # its message came a second time
    assert backend.claim_run({**run, "retries": 1})
    backend.end_run(task_id, 0)
    assert not backend.claim_run(run)  # the claim outlives the run
    assert [(r["task_id"], r["retries"], r["hostname"], r["pid"]) for r in backend.runs()] == [
        (task_id, 1, "w2@host", 7)
    ]


def test_the_runs_of_a_silent_worker_fail_and_those_of_a_live_one_wait(lost_runs, backend):
    heard(lost_runs, "w1@host", 100)
    heard(lost_runs, "w2@host", 200)
    lost = start(backend, "w1@host", 100)
    running = start(backend, "w2@host", 200)
    later(lost_runs, LOST_AFTER - 1)
    heard(lost_runs, "w2@host", 200)
    assert lost_runs.sweep() == 0  # nobody silent for LOST_AFTER yet

    later(lost_runs, SWEEP_INTERVAL)
    heard(lost_runs, "w2@host", 200)
    assert lost_runs.sweep() == 1

    meta = backend.stored_meta(lost)
    assert meta["status"] == "FAILURE"
    assert type(meta["result"]).__name__ == "WorkerLostError"
    assert "w1@host (process 100) stopped" in str(meta["result"])
    assert backend.stored_meta(running) is None
    assert [run["task_id"] for run in backend.runs()] == [running]
    later(lost_runs, SWEEP_INTERVAL)
    heard(lost_runs, "w2@host", 200)
    assert lost_runs.sweep() == 0  # once


def test_a_run_of_a_worker_never_heard_fails_once_beat_has_listened_long_enough(backend):
    # The worker died before any event of its left it (they are buffered), or beat started later.
    lost_runs = LostRuns(backend, lost_after=LOST_AFTER, clock=Clock(1000.0), wall_clock=Clock(time.time()))
    task_id = start(backend)
    assert lost_runs.sweep() == 0  # not listening
    lost_runs.listening()
    later(lost_runs, LOST_AFTER - 1)
    assert lost_runs.sweep() == 0
    lost_runs.deaf()  # the events connection dropped: the wait starts again
    later(lost_runs, 2)
    lost_runs.listening()
    assert lost_runs.sweep() == 0

    later(lost_runs, LOST_AFTER)
    assert lost_runs.sweep() == 1
    assert backend.stored_meta(task_id)["status"] == "FAILURE"


def test_a_restarted_worker_under_the_same_hostname_does_not_keep_its_old_runs_alive(lost_runs, backend):
    task_id = start(backend, "w1@host", pid=100)
    later(lost_runs, LOST_AFTER)
    heard(lost_runs, "w1@host", 101, kind="worker-online")  # the pod's container restarted

    assert lost_runs.sweep() == 1
    assert backend.stored_meta(task_id)["status"] == "FAILURE"


def test_a_clean_shutdown_ends_the_wait_and_ended_runs_are_left_alone(lost_runs, backend):
    heard(lost_runs, "w1@host", 100)
    stored = start(backend, "w1@host", 100)
    backend.mark_as_done(stored, 42)  # killed at its hard time limit, stored by the main process...
    retried = start(backend, "w1@host", 100)
    backend.mark_as_retry(retried, RuntimeError("again"), request=None)
    cut_off = start(backend, "w1@host", 100)
    heard(lost_runs, "w1@host", 100, kind="worker-offline")

    assert lost_runs.sweep() == 1
    assert backend.stored_meta(stored)["status"] == "SUCCESS"  # ... so its record is only removed
    assert backend.stored_meta(cut_off)["status"] == "FAILURE"
    assert backend.stored_meta(retried)["status"] == "RETRY"  # its next attempt is on its way
    assert backend.runs() == []


def test_a_backend_that_cannot_be_read_is_retried_at_the_next_sweep(lost_runs, monkeypatch, backend):
    task_id = start(backend)

    def unreachable():
        raise ConnectionError("Error 111 connecting")

    monkeypatch.setattr(backend, "runs", unreachable)
    assert lost_runs.sweep() == 0
    monkeypatch.undo()
    assert lost_runs.sweep() == 0  # not before SWEEP_INTERVAL
    later(lost_runs, SWEEP_INTERVAL)
    assert lost_runs.sweep() == 1
    assert backend.stored_meta(task_id)["status"] == "FAILURE"
