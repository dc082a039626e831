"""Services (writes) and selectors (reads), called directly."""

import datetime as dt

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from app import selectors, services
from app.models import Report, ReportStatus, ScheduledTask, ScheduleType, TaskLog, TaskState
from app.services import QueuedTask

pytestmark = pytest.mark.django_db

User = get_user_model()


# --- Task bookkeeping ----------------------------------------------------------


def test_task_lifecycle_is_one_row_updated_per_state():
    services.record_tasks_queued(tasks=[QueuedTask("t1", "app.tasks.add", [1, 2], {}, "default")])
    services.record_task_started(
        task_id="t1", task_name="app.tasks.add", args=[1, 2], kwargs={}, worker="w@h", queue="default", retries=0
    )
    services.record_task_succeeded(task_id="t1", result=3, duration=dt.timedelta(milliseconds=5))

    log = TaskLog.objects.get(task_id="t1")
    assert (log.state, log.result, log.worker, log.queue) == (TaskState.SUCCESS, 3, "w@h", "default")
    assert log.duration == dt.timedelta(milliseconds=5)
    assert log.started_at is not None
    assert log.finished_at >= log.started_at


def test_a_worker_faster_than_the_api_is_not_overwritten_by_the_queued_record():
    services.record_task_started(
        task_id="t2", task_name="app.tasks.add", args=[1, 2], kwargs={}, worker="w@h", queue="default", retries=0
    )
    services.record_tasks_queued(tasks=[QueuedTask("t2", "app.tasks.add", [1, 2], {}, "default")])

    assert TaskLog.objects.get(task_id="t2").state == TaskState.STARTED


def test_a_retried_attempt_clears_the_previous_reason_and_counts_retries():
    services.record_task_started(task_id="t3", task_name="x", args=[], kwargs={}, worker="w", queue="q", retries=0)
    services.record_task_retried(task_id="t3", reason=RuntimeError("flaky"))
    assert TaskLog.objects.get(task_id="t3").exception == "RuntimeError: flaky"

    services.record_task_started(task_id="t3", task_name="x", args=[], kwargs={}, worker="w", queue="q", retries=1)

    log = TaskLog.objects.get(task_id="t3")
    assert (log.state, log.retries, log.exception) == (TaskState.STARTED, 1, "")


def test_failure_without_a_known_run_time_is_computed_by_the_database():
    services.record_task_started(task_id="t4", task_name="x", args=[], kwargs={}, worker="w", queue="q", retries=0)
    TaskLog.objects.filter(task_id="t4").update(started_at=timezone.now() - dt.timedelta(seconds=30))

    services.record_task_failed(task_id="t4", exception=TimeoutError("hard limit"), traceback="tb", duration=None)

    log = TaskLog.objects.get(task_id="t4")
    assert log.state == TaskState.FAILURE
    assert log.exception == "TimeoutError: hard limit"
    assert 29 <= log.duration.total_seconds() <= 60


def test_revoked_before_start_creates_the_row():
    services.record_task_revoked(task_id="t5", task_name="app.tasks.long_running_task")

    log = TaskLog.objects.get(task_id="t5")
    assert (log.state, log.task_name) == (TaskState.REVOKED, "app.tasks.long_running_task")


def test_huge_results_are_summarised_and_long_tracebacks_trimmed():
    services.record_task_started(task_id="t6", task_name="x", args=[], kwargs={}, worker="w", queue="q", retries=0)
    services.record_task_succeeded(task_id="t6", result="x" * 100_000, duration=None)
    services.record_task_started(task_id="t7", task_name="x", args=[], kwargs={}, worker="w", queue="q", retries=0)
    services.record_task_failed(task_id="t7", exception=ValueError("v"), traceback="y" * 50_000 + "END", duration=None)

    assert TaskLog.objects.get(task_id="t6").result == {"truncated": True, "json_chars": 100_002}
    traceback = TaskLog.objects.get(task_id="t7").traceback
    assert traceback.startswith("...(truncated)")
    assert traceback.endswith("END")
    assert len(traceback) < 10_100


def test_model_helpers_mark_started_success_and_failure():
    log = TaskLog.objects.create(task_id="m1", task_name="x")
    log.mark_started(worker="w", queue="default", retries=0)
    log.mark_success({"ok": True})
    log.refresh_from_db()
    assert (log.state, log.result, log.is_finished) == (TaskState.SUCCESS, {"ok": True}, True)
    assert log.duration is not None

    log.mark_failure(ValueError("bad"), "traceback text")
    log.refresh_from_db()
    assert (log.state, log.exception, log.traceback) == (TaskState.FAILURE, "ValueError: bad", "traceback text")


def test_cleanup_task_logs_deletes_only_old_finished_rows():
    old = timezone.now() - dt.timedelta(days=40)
    TaskLog.objects.create(task_id="old-done", task_name="x", state=TaskState.SUCCESS, created_at=old)
    TaskLog.objects.create(task_id="old-running", task_name="x", state=TaskState.STARTED, created_at=old)
    TaskLog.objects.create(task_id="new-done", task_name="x", state=TaskState.SUCCESS)

    assert services.cleanup_task_logs(days=30) == 1
    assert set(TaskLog.objects.values_list("task_id", flat=True)) == {"old-running", "new-done"}


# --- Users ------------------------------------------------------------------------


def test_create_users_batch_is_idempotent():
    first = services.create_users_batch(count=30, prefix="batch")
    second = services.create_users_batch(count=40, prefix="batch")

    assert (first["created"], second["created"], second["existing"]) == (30, 10, 30)
    assert User.objects.filter(username__startswith="batch_").count() == 40
    assert not User.objects.get(username="batch_00001").has_usable_password()


def test_cleanup_old_users_spares_staff_and_recent_users():
    long_ago = timezone.now() - dt.timedelta(days=400)
    User.objects.create(username="stale", date_joined=long_ago)
    User.objects.create(username="stale-login", date_joined=long_ago, last_login=long_ago)
    User.objects.create(username="stale-staff", date_joined=long_ago, is_staff=True)
    User.objects.create(username="recent-login", date_joined=long_ago, last_login=timezone.now())
    User.objects.create(username="new")

    assert services.cleanup_old_users(days=365) == 2
    assert set(User.objects.values_list("username", flat=True)) == {"stale-staff", "recent-login", "new"}


def test_send_email_uses_the_configured_backend(mailoutbox):
    assert services.send_email(subject="Hi", message="Body", recipients=["a@example.com"]) == 1
    assert mailoutbox[0].subject == "Hi"
    assert mailoutbox[0].to == ["a@example.com"]


# --- Chunks -------------------------------------------------------------------------


def test_chunk_summaries_combine_into_totals():
    summaries = [services.summarise_chunk(chunk_id=i, data=d) for i, d in enumerate([[1, 2], [3], []])]

    combined = services.combine_chunk_summaries(summaries=summaries)

    assert combined["count"] == 3
    assert combined["sum"] == 6
    assert combined["mean"] == 2
    assert (combined["min"], combined["max"]) == (1, 3)


# --- Reports ------------------------------------------------------------------------


def test_task_summary_report_counts_rows_in_the_filter_window():
    TaskLog.objects.create(task_id="r1", task_name="app.tasks.add", state=TaskState.SUCCESS)
    TaskLog.objects.create(task_id="r2", task_name="app.tasks.add", state=TaskState.FAILURE, retries=2)
    TaskLog.objects.create(
        task_id="r3",
        task_name="app.tasks.add",
        state=TaskState.SUCCESS,
        created_at=timezone.now() - dt.timedelta(days=9),
    )
    since = (timezone.now() - dt.timedelta(days=1)).isoformat()
    report = services.create_report(report_type="task_summary", filters={"since": since})

    services.generate_report(report_id=report.pk)

    report.refresh_from_db()
    assert report.status == ReportStatus.COMPLETED
    assert report.data["total"] == 2
    assert report.data["failure_rate"] == 0.5
    assert report.data["retried_tasks"] == 1


def test_user_summary_report_counts_users():
    User.objects.create(username="u1", last_login=timezone.now())
    User.objects.create(username="u2", is_staff=True)
    report = services.create_report(report_type="user_summary", filters={})

    services.generate_report(report_id=report.pk)

    report.refresh_from_db()
    assert report.data["total"] == 2
    assert report.data["staff"] == 1
    assert report.data["never_logged_in"] == 1
    assert report.data["logged_in_last_30_days"] == 1


def test_a_failing_report_is_marked_failed_and_the_error_raised():
    report = Report.objects.create(report_type="no_such_type")

    with pytest.raises(ValueError, match="no_such_type"):
        services.generate_report(report_id=report.pk)

    report.refresh_from_db()
    assert report.status == ReportStatus.FAILED
    assert "no_such_type" in report.error


# --- Schedules ----------------------------------------------------------------------


def test_saving_a_scheduled_task_creates_and_updates_its_periodic_task():
    scheduled = services.save_scheduled_task(
        ScheduledTask(name="every-10", task="app.tasks.add", interval_seconds=10, args=[1, 2])
    )
    periodic = PeriodicTask.objects.get(name="every-10")
    assert (periodic.task, periodic.args, periodic.interval.every, periodic.enabled) == (
        "app.tasks.add",
        "[1, 2]",
        10,
        True,
    )

    scheduled.schedule_type = ScheduleType.CRONTAB
    scheduled.crontab_minute, scheduled.crontab_hour = "15", "2"
    services.save_scheduled_task(scheduled)

    periodic.refresh_from_db()
    assert periodic.interval is None
    assert (periodic.crontab.minute, periodic.crontab.hour) == ("15", "2")
    assert scheduled.schedule_display == "cron 15 2 * * *"
    assert PeriodicTask.objects.count() == 1


def test_disabling_a_scheduled_task_disables_its_periodic_task():
    scheduled = services.save_scheduled_task(ScheduledTask(name="s", task="app.tasks.add", interval_seconds=5))

    assert services.set_scheduled_tasks_enabled(scheduled_tasks=[scheduled], enabled=False) == 1
    assert PeriodicTask.objects.get(name="s").enabled is False
    assert services.set_scheduled_tasks_enabled(scheduled_tasks=[scheduled], enabled=False) == 0


def test_deleting_a_scheduled_task_deletes_its_periodic_task():
    scheduled = services.save_scheduled_task(ScheduledTask(name="gone", task="app.tasks.add", interval_seconds=5))

    services.delete_scheduled_task(scheduled)

    assert not PeriodicTask.objects.filter(name="gone").exists()
    assert not ScheduledTask.objects.exists()


@pytest.mark.parametrize(
    ("fields", "error_field"),
    [
        ({"task": "app.tasks.nope", "interval_seconds": 5}, "task"),
        ({"task": "app.tasks.add", "interval_seconds": None}, "interval_seconds"),
        ({"task": "app.tasks.add", "interval_seconds": 5, "args": {"a": 1}}, "args"),
    ],
)
def test_invalid_scheduled_tasks_are_refused_and_nothing_is_saved(fields, error_field):
    with pytest.raises(ValidationError) as error:
        services.save_scheduled_task(ScheduledTask(name="bad", **fields))

    assert error_field in error.value.message_dict
    assert not ScheduledTask.objects.exists()
    assert not PeriodicTask.objects.filter(name="bad").exists()


def test_default_schedules_are_created_once():
    first = services.ensure_default_schedules()
    second = services.ensure_default_schedules()

    assert len(first) == 4
    assert second == []
    canaries = ScheduledTask.objects.filter(task="app.tasks.health_check").order_by("queue")
    assert [(c.queue, c.interval_seconds, c.periodic_task.queue, c.periodic_task.enabled) for c in canaries] == [
        ("default", 60, "default", True),
        ("long", 60, "long", True),
    ]


# --- Selectors ----------------------------------------------------------------------


def test_known_task_ids_come_from_task_log_or_task_result():
    from django_celery_results.models import TaskResult

    TaskLog.objects.create(task_id="in-log", task_name="x")
    TaskResult.objects.create(task_id="in-results", status="SUCCESS")

    assert selectors.is_known_task_id(task_id="in-log")
    assert selectors.is_known_task_id(task_id="in-results")
    assert not selectors.is_known_task_id(task_id="nowhere")


# --- Result backend -------------------------------------------------------------------


def test_result_backend_keeps_one_row_per_task_and_the_start_time():
    from celery import states
    from django_celery_results.models import TaskResult

    from project.celery import app

    backend = app.backend
    backend.store_result("rb-1", None, states.STARTED)
    started_at = TaskResult.objects.get(task_id="rb-1").date_started
    backend.store_result("rb-1", {"answer": 42}, states.SUCCESS)

    row = TaskResult.objects.get(task_id="rb-1")
    assert (row.status, row.date_started) == ("SUCCESS", started_at)
    assert started_at is not None
    assert row.date_done >= started_at
    assert backend.get_task_meta("rb-1")["result"] == {"answer": 42}
    assert type(backend).__name__ == "UpsertDatabaseBackend"


def test_a_scheduled_task_cannot_take_the_name_of_another_beat_task():
    from django_celery_beat.models import IntervalSchedule

    every = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="made-in-beat-admin", task="app.tasks.add", interval=every)

    with pytest.raises(ValidationError) as error:
        services.save_scheduled_task(ScheduledTask(name="made-in-beat-admin", task="app.tasks.add", interval_seconds=5))

    assert "name" in error.value.message_dict
    assert not ScheduledTask.objects.exists()
