"""Every Celery pattern, run by a real prefork worker over a real broker (Redis, and RabbitMQ
when RABBITMQ_URL is given). States go to the Redis result backend, and the history recorder
folds them into TaskLog."""

import time

import pytest
from celery.result import AsyncResult

from app import workflows
from app.models import TaskLog, TaskState
from tests.conftest import RABBITMQ_GROUP, wait_until

# One process runs the module (with the other RabbitMQ tests): its workers start once.
pytestmark = [
    pytest.mark.integration,
    RABBITMQ_GROUP,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("task_history"),
]


def task_log_state(task_id: str, *states: str) -> TaskLog | None:
    return TaskLog.objects.filter(task_id=task_id, state__in=states).first()


def succeeded_logs(task_ids: list[str]) -> dict[str, TaskLog]:
    """TaskLog rows once all are SUCCESS: the recorder writes them a moment after the result
    backend stored the state a caller's .get() returns."""

    def all_succeeded():
        logs = {log.task_id: log for log in TaskLog.objects.filter(task_id__in=task_ids, state=TaskState.SUCCESS)}
        return logs if len(logs) == len(task_ids) else None

    return wait_until(all_succeeded, timeout=10, message=f"TaskLog SUCCESS for {len(task_ids)} tasks")


def test_chain_passes_each_result_to_the_next_step(broker):
    started = workflows.start_chain(value=3)

    result = AsyncResult(started.task_id, app=broker.app).get(timeout=30)

    assert result == {"input": 16, "result": 256}  # (3 * 2 + 10) ** 2
    logs = succeeded_logs(started.task_ids)
    assert {log.worker for log in logs.values()} == {broker.worker_hostname}
    assert [logs[task_id].task_name for task_id in started.task_ids] == [
        "app.tasks.workflow_step_1",
        "app.tasks.workflow_step_2",
        "app.tasks.workflow_step_3",
    ]


def test_group_runs_every_member(broker):
    started = workflows.start_group(operation="multiply", pairs=[(2, 3), (4, 5), (6, 7)])

    for task_id, expected in zip(started.task_ids, [6, 20, 42], strict=True):
        assert AsyncResult(task_id, app=broker.app).get(timeout=30) == expected
    assert {log.worker for log in succeeded_logs(started.task_ids).values()} == {broker.worker_hostname}


def test_chord_aggregates_every_chunk_once_all_are_done(broker):
    chunks = [[1, 2, 3], [4, 5], [6], []]

    started = workflows.start_chord(chunks=chunks)
    summary = AsyncResult(started.task_id, app=broker.app).get(timeout=30)

    assert summary["chunks"] == 4
    assert summary["count"] == 6
    assert summary["sum"] == 21
    assert (summary["min"], summary["max"]) == (1, 6)
    assert {log.worker for log in succeeded_logs(started.task_ids).values()} == {broker.worker_hostname}


def test_long_running_task_reports_progress_then_completes(broker):
    started = workflows.start_long_running(total_steps=6, step_seconds=0.4)
    result = AsyncResult(started.task_id, app=broker.app)

    progress = wait_until(
        lambda: result.info if result.state == "PROGRESS" else None, timeout=30, message="a PROGRESS state"
    )
    assert progress["total"] == 6
    assert 1 <= progress["current"] < 6
    assert progress["percent"] == round(100 * progress["current"] / 6, 1)

    assert result.get(timeout=30)["percent"] == 100.0
    log = succeeded_logs([started.task_id])[started.task_id]
    assert log.queue == "long"
    assert log.duration.total_seconds() >= 6 * 0.4


def test_retry_backs_off_then_succeeds(broker):
    started = workflows.start_retry(fail_probability=0.0, fail_times=2)

    result = AsyncResult(started.task_id, app=broker.app).get(timeout=60)

    assert result == {"status": "ok", "attempts": 3}
    assert succeeded_logs([started.task_id])[started.task_id].retries == 2


def test_retry_gives_up_after_max_retries(broker):
    from app.tasks import RETRY_MAX_RETRIES

    started = workflows.start_retry(fail_probability=1.0, fail_times=None)
    result = AsyncResult(started.task_id, app=broker.app)

    # Full jitter keeps each wait in [0, 2**n] s: five retries take at most 1+2+4+8+16 s.
    wait_until(lambda: result.state == "FAILURE", timeout=90, interval=0.5, message="FAILURE after retries")
    log = wait_until(lambda: task_log_state(started.task_id, TaskState.FAILURE), message="TaskLog FAILURE")
    assert log.retries == RETRY_MAX_RETRIES
    assert log.exception.startswith("TransientError")


def test_soft_time_limit_saves_partial_work_and_exits_cleanly(broker):
    started = workflows.start_time_limited(duration=30, soft_time_limit=1, time_limit=10)

    result = AsyncResult(started.task_id, app=broker.app).get(timeout=30)

    assert result["status"] == "partial"
    assert 1 <= result["steps_done"] < 300
    assert succeeded_logs([started.task_id])


def test_a_hard_limit_below_the_tasks_soft_limit_is_honoured(broker):
    # The task's own limits are soft 10 s, hard 15 s; a call with a hard limit of 2 s gets a soft
    # limit before it (app/time_limits.py), so it saves its work in time and is not killed.
    started = workflows.start_time_limited(duration=30, soft_time_limit=None, time_limit=2)

    result = AsyncResult(started.task_id, app=broker.app).get(timeout=30)

    assert result["status"] == "partial"
    assert result["elapsed"] < 2
    log = succeeded_logs([started.task_id])[started.task_id]
    assert (log.time_limit, log.soft_time_limit) == (2.0, 1.333)
    time.sleep(1)  # past the hard limit: nothing kills it and nothing replaces its SUCCESS
    log.refresh_from_db()
    assert log.state == TaskState.SUCCESS


def test_hard_time_limit_kills_the_task(broker):
    from app.tasks import time_limited_task

    # The clean-up after the soft limit outlasts the hard limit: the worker kills the child.
    result = time_limited_task.apply_async(args=[30], kwargs={"cleanup_seconds": 30}, soft_time_limit=1, time_limit=2)

    wait_until(lambda: result.state == "FAILURE", timeout=30, message="FAILURE at the hard limit")
    assert "TimeLimitExceeded" in repr(result.result)
    log = wait_until(lambda: task_log_state(result.id, TaskState.FAILURE), message="TaskLog FAILURE")
    assert log.exception.startswith("TimeLimitExceeded")
    assert (log.time_limit, log.soft_time_limit) == (2.0, 1.0)
    assert log.duration is not None
    assert log.duration.total_seconds() >= 1.5


def test_revoke_terminates_a_running_task(broker):
    started = workflows.start_long_running(total_steps=200, step_seconds=0.1)
    wait_until(lambda: task_log_state(started.task_id, TaskState.STARTED), message="task started")

    broker.app.control.revoke(started.task_id, terminate=True, signal="SIGTERM")

    log = wait_until(lambda: task_log_state(started.task_id, TaskState.REVOKED), message="TaskLog REVOKED")
    assert log.finished_at is not None
    assert AsyncResult(started.task_id, app=broker.app).state == "REVOKED"


def test_report_is_computed_from_the_database(broker):
    from app.models import Report, ReportStatus

    workflows.start_simple(operation="add", x=1, y=1)
    started = workflows.start_report(report_type="task_summary", filters={})

    AsyncResult(started.task_id, app=broker.app).get(timeout=30)

    report = Report.objects.get(pk=started.report_id)
    assert report.status == ReportStatus.COMPLETED
    assert report.data["total"] >= 1
    assert "app.tasks.add" in {row["task_name"] for row in report.data["by_task"]}


def test_create_users_twice_creates_no_duplicates(broker):
    from django.contrib.auth import get_user_model

    first = workflows.start_create_users(count=25, prefix="twice")
    assert AsyncResult(first.task_id, app=broker.app).get(timeout=30)["created"] == 25
    second = workflows.start_create_users(count=25, prefix="twice")
    assert AsyncResult(second.task_id, app=broker.app).get(timeout=30) == {
        "requested": 25,
        "created": 0,
        "existing": 25,
        "prefix": "twice",
    }
    assert get_user_model().objects.filter(username__startswith="twice_").count() == 25


def test_beat_picks_up_schedule_changes(redis_worker, start_beat):
    from app import services
    from app.models import ScheduledTask

    marker = int(time.time() * 1000) % 1_000_000
    scheduled = services.save_scheduled_task(
        ScheduledTask(name=f"beat-test-{marker}", task="app.tasks.add", interval_seconds=1, args=[marker, 1])
    )
    start_beat()

    def runs() -> int:
        return TaskLog.objects.filter(task_name="app.tasks.add", args=[marker, 1], state=TaskState.SUCCESS).count()

    wait_until(lambda: runs() >= 2, timeout=45, interval=0.5, message="beat to run the new schedule twice")

    services.set_scheduled_tasks_enabled(scheduled_tasks=[scheduled], enabled=False)
    time.sleep(8)  # beat re-reads changed schedules at least every 5 s
    settled = runs()
    time.sleep(4)
    assert runs() == settled, "a disabled schedule kept running"
    scheduled.refresh_from_db()
    assert scheduled.periodic_task.total_run_count >= 2


def test_bulk_emails_fan_out_as_a_group_of_email_tasks(broker):
    from django.contrib.auth import get_user_model

    from app.tasks import send_bulk_emails

    users = [get_user_model().objects.create(username=f"mail{i}", email=f"mail{i}@example.com") for i in range(3)]
    no_address = get_user_model().objects.create(username="silent", email="")

    outcome = send_bulk_emails.delay([u.pk for u in [*users, no_address]], "Hello", "Body").get(timeout=30)

    assert outcome["recipients"] == 3
    for task_id in outcome["task_ids"]:
        assert AsyncResult(task_id, app=broker.app).get(timeout=30) == {"sent": 1}


def test_health_check_task_reports_every_dependency_healthy(redis_worker):
    from app.tasks import health_check

    report = health_check.delay().get(timeout=30)

    assert report["healthy"] is True
    assert set(report["checks"]) == {"database", "cache", "broker", "result_backend"}


def test_debug_task_sees_its_worker_and_queue(redis_worker):
    from app.tasks import debug_task

    info = debug_task.delay().get(timeout=30)

    assert (info["hostname"], info["queue"], info["retries"]) == (redis_worker.hostname, "default", 0)
