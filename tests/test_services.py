"""Services (writes) and selectors (reads), called directly."""

import datetime as dt

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from app import result_backend, selectors, services
from app.models import Report, ReportStatus, ScheduledTask, ScheduleType, TaskLog, TaskState

pytestmark = pytest.mark.django_db

User = get_user_model()


# --- Task history (TaskLog is folded in tests/test_task_history.py) ---------------


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

    assert len(first) == 5
    assert second == []
    canaries = ScheduledTask.objects.filter(task="app.tasks.health_check").order_by("queue")
    assert [(c.queue, c.interval_seconds, c.periodic_task.queue, c.periodic_task.enabled) for c in canaries] == [
        ("default", 60, "default", True),
        ("long", 60, "long", True),
    ]


# --- Selectors ----------------------------------------------------------------------


def test_known_task_ids_are_those_the_result_backend_or_the_history_holds():
    from project.celery import app

    TaskLog.objects.create(task_id="in-history", task_name="x")  # its live state expired
    app.backend.record_queued(
        [result_backend.queued_meta(task_id="queued-1", task_name="app.tasks.add", args=[], kwargs={}, queue="default")]
    )
    try:
        assert selectors.is_known_task_id(task_id="in-history")
        assert selectors.is_known_task_id(task_id="queued-1")
        assert not selectors.is_known_task_id(task_id="nowhere")
    finally:
        app.backend.forget("queued-1")


def test_a_task_state_comes_from_the_result_backend_while_it_keeps_it_then_from_the_history():
    from celery import states

    from project.celery import app

    app.backend.store_result("state-1", 42, states.SUCCESS)
    TaskLog.objects.create(task_id="state-1", task_name="app.tasks.add", state=TaskState.SUCCESS, result=41)
    try:
        assert selectors.task_state(task_id="state-1")["result"] == 42  # the backend's, not merged
    finally:
        app.backend.forget("state-1")

    assert selectors.task_state(task_id="state-1")["result"] == 41  # expired there: the history's
    assert selectors.task_state(task_id="never-handed-out") is None


def test_a_scheduled_task_cannot_take_the_name_of_another_beat_task():
    from django_celery_beat.models import IntervalSchedule

    every = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="made-in-beat-admin", task="app.tasks.add", interval=every)

    with pytest.raises(ValidationError) as error:
        services.save_scheduled_task(ScheduledTask(name="made-in-beat-admin", task="app.tasks.add", interval_seconds=5))

    assert "name" in error.value.message_dict
    assert not ScheduledTask.objects.exists()
