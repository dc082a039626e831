"""At-most-once tasks of a worker that stopped are stored as FAILURE (app/lost_tasks.py), with
the project's real result backend; the clock is a fake one."""

import uuid

import pytest

from app.lost_tasks import RunningTasks
from project.celery import app as celery_app

pytestmark = pytest.mark.django_db(transaction=True)

AT_MOST_ONCE, AT_LEAST_ONCE = "app.tasks.debug_task", "app.tasks.add"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def started(running: RunningTasks, hostname: str, name: str) -> str:
    task_id = str(uuid.uuid4())
    running.event({"type": "task-received", "hostname": hostname, "uuid": task_id, "name": name})
    running.event({"type": "task-started", "hostname": hostname, "uuid": task_id})
    return task_id


def state(task_id: str) -> dict | None:
    return celery_app.backend.stored_meta(task_id)


@pytest.fixture
def running(task_history):
    return RunningTasks(celery_app, lost_after=60, clock=Clock())


def test_the_at_most_once_tasks_of_a_silent_worker_fail_and_the_at_least_once_ones_wait(running):
    once = started(running, "w1@host", AT_MOST_ONCE)
    again = started(running, "w1@host", AT_LEAST_ONCE)
    other = started(running, "w2@host", AT_MOST_ONCE)
    running.clock.now += 59
    running.event({"type": "worker-heartbeat", "hostname": "w2@host"})
    assert running.sweep() == 0  # nobody silent for 60 s yet

    running.clock.now += 2
    assert running.sweep() == 1

    meta = state(once)
    assert meta["status"] == "FAILURE"
    assert type(meta["result"]).__name__ == "WorkerLostError"
    assert "w1@host stopped" in str(meta["result"])
    assert state(again) is None  # the broker gives it back
    assert state(other) is None  # its worker still sends events
    assert running.sweep() == 0  # once


def test_finished_tasks_a_clean_shutdown_and_stored_end_states_are_left_alone(running):
    finished = started(running, "w1@host", AT_MOST_ONCE)
    running.event({"type": "task-succeeded", "hostname": "w1@host", "uuid": finished})
    stored = started(running, "w1@host", AT_MOST_ONCE)
    celery_app.backend.mark_as_done(stored, 42)  # its success event was missed
    shut_down = started(running, "w2@host", AT_MOST_ONCE)
    running.event({"type": "worker-offline", "hostname": "w2@host"})

    running.clock.now += 120

    assert running.sweep() == 0
    assert state(finished) is None
    assert state(stored)["status"] == "SUCCESS"
    assert state(shut_down) is None
