"""TaskLog bookkeeping from Celery's signals, in process (eager) — the real-worker path is
covered by test_patterns.py. Eager mode is fine here: it fires the same signals."""

import pytest

from app import tasks
from app.models import TaskLog, TaskState

pytestmark = pytest.mark.django_db


@pytest.fixture
def eager(settings):
    from project.celery import app

    app.conf.task_always_eager = True
    app.conf.task_store_eager_result = False
    yield app
    app.conf.task_always_eager = False


def test_a_successful_task_ends_as_success_with_its_result(eager):
    result = tasks.add.delay(2, 3)

    log = TaskLog.objects.get(task_id=result.id)
    assert (log.state, log.result, log.task_name, log.args) == (TaskState.SUCCESS, 5, "app.tasks.add", [2, 3])
    assert log.duration is not None


def test_a_failing_task_ends_as_failure_with_exception_and_traceback(eager):
    result = tasks.aggregate_results.apply(args=[[{"bad": "summary"}]])

    log = TaskLog.objects.get(task_id=result.id)
    assert log.state == TaskState.FAILURE
    assert log.exception.startswith("KeyError")
    assert "Traceback" in log.traceback


def test_a_bookkeeping_error_never_fails_the_task(eager, monkeypatch):
    from app import services

    def broken(**kwargs):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(services, "record_task_started", broken)
    monkeypatch.setattr(services, "record_task_succeeded", broken)

    assert tasks.multiply.delay(6, 7).get() == 42
    assert not TaskLog.objects.exists()
