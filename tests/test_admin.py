"""The admin: every page renders its data, actions reach the real broker, and schedules and
tokens are saved through app.services (beat's PeriodicTask, token digests)."""

import base64
import datetime as dt
import json
import os
import re
import time
import uuid

import pytest
import redis
from celery import Celery
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from app import admin as admin_module
from app import selectors, services, workflows
from app.models import ApiToken, Report, ReportStatus, ReportType, ScheduledTask, ScheduleType, TaskLog, TaskState
from project.celery import app as celery_app
from tests.conftest import wait_until
from tests.resources import free_port

pytestmark = pytest.mark.django_db


def task_log(**fields) -> TaskLog:
    defaults = {"task_id": str(uuid.uuid4()), "task_name": "app.tasks.add", "args": [2, 3], "kwargs": {}}
    return TaskLog.objects.create(**{**defaults, **fields})


def scheduled_task(name: str, **fields) -> ScheduledTask:
    defaults = {"task": "app.tasks.health_check", "schedule_type": ScheduleType.INTERVAL, "interval_seconds": 60}
    return services.save_scheduled_task(ScheduledTask(name=name, **{**defaults, **fields}))


def new_user(username: str):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(username)


def report(**fields) -> Report:
    defaults = {"report_type": ReportType.TASK_SUMMARY, "filters": {"task_name": "app.tasks.add"}}
    return Report.objects.create(**{**defaults, **fields})


def changelist(model: str) -> str:
    return reverse(f"admin:app_{model}_changelist")


def change_page(obj) -> str:
    return reverse(f"admin:app_{obj._meta.model_name}_change", args=[obj.pk])


def run_action(client, model: str, action: str, rows):
    return client.post(changelist(model), {"action": action, "_selected_action": [row.pk for row in rows]}, follow=True)


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def schedule_form(**overrides) -> dict:
    data = {
        "name": "add-every-two-minutes",
        "task": "app.tasks.add",
        "schedule_type": ScheduleType.INTERVAL,
        "interval_seconds": "120",
        "crontab_minute": "*",
        "crontab_hour": "*",
        "crontab_day_of_week": "*",
        "crontab_day_of_month": "*",
        "crontab_month_of_year": "*",
        "args": "[1, 2]",
        "kwargs": "{}",
        "queue": "",
        "enabled": "on",
        "description": "",
    }
    return {**data, **overrides}


@pytest.fixture
def broker_down(monkeypatch):
    """The admin publishes through a real Celery app whose broker port refuses connections."""
    down = Celery("broker-down", set_as_current=False)
    down.config_from_object("django.conf:settings", namespace="CELERY")
    down.conf.broker_write_url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setattr(workflows, "current_app", down)
    yield down
    down.close()


@pytest.fixture
def control_broadcasts():
    """Read the control messages (revoke and the like) that workers would receive, off the real
    broker: kombu's Redis transport publishes them on the *.celery.pidbox channel."""
    client = redis.Redis.from_url(celery_app.conf.broker_url)
    pubsub = client.pubsub()
    pubsub.psubscribe("*celery.pidbox*")
    assert pubsub.get_message(timeout=5)["type"] == "psubscribe"

    def received(*, method: str, timeout: float = 5) -> list[dict]:
        bodies, deadline = [], time.monotonic() + timeout
        while not bodies and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.2)
            if message and message["type"] == "pmessage":
                body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
                if body["method"] == method:
                    bodies.append(body)
        return bodies

    yield received
    pubsub.close()
    client.close()


# --- Helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.85, "850 ms"), (0.9996, "1.0 s"), (2.4, "2.4 s"), (185, "3 min 5 s"), (7800, "2 h 10 min")],
)
def test_human_duration(seconds, expected):
    assert admin_module.human_duration(dt.timedelta(seconds=seconds)) == expected


def test_human_duration_of_nothing_is_empty():
    assert admin_module.human_duration(None) is None


# --- Pages render with their data -----------------------------------------------------------------


def test_task_log_changelist_shows_badges_short_ids_names_and_times_and_durations(admin_client):
    created_at = dt.datetime(2026, 12, 7, 23, 21, 56, tzinfo=dt.UTC)
    succeeded = task_log(state=TaskState.SUCCESS, duration=dt.timedelta(milliseconds=850), created_at=created_at)
    failed = task_log(state=TaskState.FAILURE, duration=dt.timedelta(minutes=3, seconds=5))

    response = admin_client.get(changelist("tasklog"))

    assert response.status_code == 200
    html = response.content.decode()
    assert f'<code title="{succeeded.task_id}">{succeeded.task_id[:8]}</code>' in html
    assert '<span title="app.tasks.add">add</span>' in html
    assert '<span title="2026-12-07 23:21:56 UTC">Dec 7, 23:21:56</span>' in html
    assert '<span class="badge badge-success">SUCCESS</span>' in html
    assert '<span class="badge badge-failure">FAILURE</span>' in html
    assert "850 ms" in html
    assert "3 min 5 s" in html
    assert failed.task_id[:8] in html


def test_task_log_search_finds_a_row_by_its_short_id(admin_client):
    wanted, other = task_log(), task_log()

    response = admin_client.get(changelist("tasklog"), {"q": wanted.task_id[:8]})

    assert list(response.context["cl"].result_list) == [wanted]
    assert other.task_id not in response.content.decode()


def test_task_log_change_page_is_read_only(admin_client):
    row = task_log(
        state=TaskState.FAILURE,
        kwargs={"retry": True},
        exception="ValueError: boom",
        traceback='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom',
    )

    response = admin_client.get(change_page(row))

    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="task_name"' not in html
    assert 'name="_save"' not in html
    assert "&quot;retry&quot;: true" in html
    assert '  File "x.py"' in html.replace("&quot;", '"')
    assert admin_client.get(reverse("admin:app_tasklog_add")).status_code == 403


def test_report_pages_show_status_badge_and_pretty_printed_data(admin_client):
    done = report(status=ReportStatus.COMPLETED, data={"total": 3, "by_state": {"SUCCESS": 3}})
    report(status=ReportStatus.FAILED, error="boom")

    listing = admin_client.get(changelist("report"))
    detail = admin_client.get(change_page(done))

    assert listing.status_code == 200
    assert '<span class="badge badge-completed">Completed</span>' in listing.content.decode()
    assert '<span class="badge badge-failed">Failed</span>' in listing.content.decode()
    assert detail.status_code == 200
    html = detail.content.decode()
    assert (
        "<pre>{\n  &quot;by_state&quot;: {\n    &quot;SUCCESS&quot;: 3\n  },\n  &quot;total&quot;: 3\n}</pre>" in html
    )
    assert 'name="data"' not in html
    assert admin_client.get(reverse("admin:app_report_add")).status_code == 403


def test_scheduled_task_changelist_shows_schedule_enabled_badge_and_runs(admin_client):
    nightly = scheduled_task(
        "nightly-cleanup",
        task="app.tasks.cleanup_task_logs",
        schedule_type=ScheduleType.CRONTAB,
        crontab_minute="30",
        crontab_hour="3",
        enabled=False,
    )
    scheduled_task("health-every-minute")
    PeriodicTask.objects.filter(pk=nightly.periodic_task_id).update(total_run_count=7, last_run_at=timezone.now())

    response = admin_client.get(changelist("scheduledtask"))

    assert response.status_code == 200
    html = response.content.decode()
    assert "cron 30 3 * * *" in html
    assert "every 60 s" in html
    assert '<span class="badge badge-yes">Yes</span>' in html
    assert '<span class="badge badge-no">No</span>' in html
    assert '<td class="field-runs">7</td>' in html


def test_scheduled_task_change_page_renders(admin_client):
    row = scheduled_task("health-every-minute")

    response = admin_client.get(change_page(row))

    assert response.status_code == 200
    assert "Crontab schedule" in response.content.decode()
    assert 'value="app.tasks.health_check"' in response.content.decode()


def test_the_index_has_one_schedule_editor_and_no_add_for_rows_celery_writes(admin_client):
    index = admin_client.get(reverse("admin:index")).content.decode()

    assert "Scheduled tasks" in index
    assert "API tokens" in index
    assert "Periodic tasks" not in index  # django-celery-beat's editor: Scheduled tasks write its rows
    assert reverse("admin:django_celery_results_taskresult_changelist") in index
    assert reverse("admin:django_celery_results_taskresult_add") not in index
    assert admin_client.get(reverse("admin:django_celery_results_taskresult_add")).status_code == 403
    assert admin_client.get(reverse("admin:django_celery_results_groupresult_add")).status_code == 403
    assert admin_client.get(reverse("admin:django_celery_results_taskresult_changelist")).status_code == 200


def test_api_token_pages_never_show_the_digest(admin_client, admin_user):
    token, _secret = services.create_api_token(name="ci", owner=admin_user)

    listing = admin_client.get(changelist("apitoken"))
    detail = admin_client.get(change_page(token))

    assert listing.status_code == 200
    assert detail.status_code == 200
    assert token.prefix in listing.content.decode()
    assert token.digest not in listing.content.decode() + detail.content.decode()
    assert 'name="digest"' not in detail.content.decode()


def _queries_for(client, url: str) -> int:
    with CaptureQueriesContext(connection) as context:
        assert client.get(url).status_code == 200
    return len(context)


@pytest.mark.parametrize(
    ("model", "make_row"),
    [
        ("tasklog", lambda i: task_log(state=TaskState.SUCCESS, duration=dt.timedelta(seconds=i))),
        ("report", lambda i: report(status=ReportStatus.COMPLETED, data={"i": i})),
        ("scheduledtask", lambda i: scheduled_task(f"schedule-{i}")),
        ("apitoken", lambda i: services.create_api_token(name=f"token-{i}", owner=new_user(f"owner-{i}"))),
    ],
)
def test_changelist_makes_no_query_per_row(admin_client, model, make_row):
    make_row(0)
    _queries_for(admin_client, changelist(model))  # warms caches (session, content types)
    with_one_row = _queries_for(admin_client, changelist(model))
    for i in range(1, 6):
        make_row(i)

    assert _queries_for(admin_client, changelist(model)) == with_one_row


# --- TaskLog actions against the real broker ---------------------------------------------------------


def rows_other_than(*rows) -> list[TaskLog]:
    return list(TaskLog.objects.exclude(pk__in=[row.pk for row in rows]))


def test_rerun_action_resends_failed_tasks_and_skips_the_rest(admin_client, task_history):
    failed = task_log(state=TaskState.FAILURE, task_name="app.tasks.add", args=[2, 3], kwargs={})
    succeeded = task_log(state=TaskState.SUCCESS, task_name="app.tasks.multiply", args=[4, 5])

    response = run_action(admin_client, "tasklog", "rerun_failed", [failed, succeeded])

    assert response.status_code == 200
    assert messages_of(response) == ["Re-sent 1 failed task(s); skipped 1 not in state FAILURE."]
    [rerun] = wait_until(lambda: rows_other_than(failed, succeeded), message="the re-sent task recorded")
    assert (rerun.task_name, rerun.args, rerun.kwargs, rerun.queue) == ("app.tasks.add", [2, 3], {}, "default")
    assert rerun.task_id != failed.task_id
    # Queued, known to the API (or already run, when a worker of a test module that ran earlier
    # is still consuming the suite's broker).
    assert rerun.state in (TaskState.PENDING, TaskState.SUCCESS)
    assert celery_app.backend.stored_meta(rerun.task_id)["status"] in ("PENDING", "SUCCESS")
    failed.refresh_from_db()
    assert failed.state == TaskState.FAILURE


def test_rerun_action_records_the_queue_the_task_is_routed_to(admin_client, task_history):
    failed = task_log(state=TaskState.FAILURE, task_name="app.tasks.long_running_task", args=[1, 0.0])

    run_action(admin_client, "tasklog", "rerun_failed", [failed])

    [rerun] = wait_until(lambda: rows_other_than(failed), message="the re-sent task recorded")
    assert (rerun.task_name, rerun.args, rerun.queue) == ("app.tasks.long_running_task", [1, 0.0], "long")


def test_rerun_action_sends_the_original_calls_queue_and_time_limits(admin_client, task_history):
    queue = f"rerun-{uuid.uuid4().hex[:8]}"  # no worker consumes it: the message stays to be read
    failed = task_log(
        state=TaskState.FAILURE,
        task_name="app.tasks.time_limited_task",
        args=[30],
        queue=queue,
        time_limit=2.0,
        soft_time_limit=1.5,
    )

    run_action(admin_client, "tasklog", "rerun_failed", [failed])

    [rerun] = wait_until(lambda: rows_other_than(failed), message="the re-sent task recorded")
    assert (rerun.queue, rerun.time_limit, rerun.soft_time_limit) == (queue, 2.0, 1.5)
    broker = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    message = json.loads(broker.rpop(queue))
    assert message["headers"]["id"] == rerun.task_id
    assert message["headers"]["timelimit"] == [2.0, 1.5]


def test_rerun_action_with_no_failed_task_sends_nothing(admin_client):
    started = task_log(state=TaskState.STARTED)

    response = run_action(admin_client, "tasklog", "rerun_failed", [started])

    assert messages_of(response) == ["Re-sent 0 failed task(s); skipped 1 not in state FAILURE."]
    assert TaskLog.objects.count() == 1


def test_rerun_action_reports_a_broker_error_instead_of_failing(admin_client, broker_down):
    failed = task_log(state=TaskState.FAILURE)

    response = run_action(admin_client, "tasklog", "rerun_failed", [failed])

    assert response.status_code == 200
    [message] = messages_of(response)
    assert message.startswith("Broker unavailable: re-sent 0 of 1 failed task(s)")
    assert TaskLog.objects.count() == 1


def test_revoke_action_broadcasts_a_terminating_revoke_for_running_tasks_only(admin_client, control_broadcasts):
    running = [task_log(state=state) for state in (TaskState.PENDING, TaskState.STARTED, TaskState.RETRY)]
    finished = task_log(state=TaskState.SUCCESS)

    response = run_action(admin_client, "tasklog", "revoke_running", [*running, finished])

    assert messages_of(response) == ["Revoke sent for 3 task(s); skipped 1 not pending, started or retrying."]
    [revoke] = control_broadcasts(method="revoke")
    assert sorted(revoke["arguments"]["task_id"]) == sorted(row.task_id for row in running)
    assert revoke["arguments"]["terminate"] is True
    assert revoke["arguments"]["signal"] == "SIGTERM"


def test_revoke_action_reports_a_broker_error_instead_of_failing(admin_client, broker_down):
    started = task_log(state=TaskState.STARTED)

    response = run_action(admin_client, "tasklog", "revoke_running", [started])

    assert response.status_code == 200
    [message] = messages_of(response)
    assert message.startswith("Broker unavailable: nothing revoked")


# --- ScheduledTask: saved through the services, so beat's PeriodicTask follows --------------------


def test_disable_and_enable_actions_update_the_linked_periodic_tasks(admin_client):
    rows = [scheduled_task("first"), scheduled_task("second")]

    disabled = run_action(admin_client, "scheduledtask", "disable_selected", rows)

    assert messages_of(disabled) == ["Disabled 2 scheduled task(s)."]
    assert list(PeriodicTask.objects.filter(scheduled_task__in=rows).values_list("enabled", flat=True)) == [
        False,
        False,
    ]

    enabled = run_action(admin_client, "scheduledtask", "enable_selected", rows[:1])

    assert messages_of(enabled) == ["Enabled 1 scheduled task(s)."]
    assert PeriodicTask.objects.get(scheduled_task=rows[0]).enabled is True
    assert PeriodicTask.objects.get(scheduled_task=rows[1]).enabled is False


def test_add_form_creates_the_periodic_task(admin_client):
    response = admin_client.post(reverse("admin:app_scheduledtask_add"), schedule_form())

    assert response.status_code == 302
    scheduled = ScheduledTask.objects.select_related("periodic_task__interval").get(name="add-every-two-minutes")
    periodic = scheduled.periodic_task
    assert (periodic.name, periodic.task, periodic.args, periodic.enabled) == (
        "add-every-two-minutes",
        "app.tasks.add",
        "[1, 2]",
        True,
    )
    assert (periodic.interval.every, periodic.interval.period) == (120, "seconds")


def test_change_form_switching_to_crontab_updates_the_periodic_task(admin_client):
    scheduled = scheduled_task("add-every-two-minutes", task="app.tasks.add")
    form = schedule_form(schedule_type=ScheduleType.CRONTAB, interval_seconds="", crontab_minute="0", crontab_hour="6")

    response = admin_client.post(change_page(scheduled), form)

    assert response.status_code == 302
    periodic = PeriodicTask.objects.select_related("crontab").get(scheduled_task=scheduled)
    assert periodic.interval is None
    assert (periodic.crontab.minute, periodic.crontab.hour) == ("0", "6")


def test_add_form_with_an_unknown_task_shows_the_error_and_creates_nothing(admin_client):
    response = admin_client.post(reverse("admin:app_scheduledtask_add"), schedule_form(task="app.tasks.nope"))

    assert response.status_code == 200
    assert response.context["adminform"].form.errors["task"] == [
        "Unknown task 'app.tasks.nope'; registered: app.tasks.*"
    ]
    assert not ScheduledTask.objects.exists()
    assert not PeriodicTask.objects.filter(name="add-every-two-minutes").exists()


def test_add_form_with_an_interval_schedule_needs_seconds(admin_client):
    response = admin_client.post(reverse("admin:app_scheduledtask_add"), schedule_form(interval_seconds=""))

    assert response.status_code == 200
    assert "interval_seconds" in response.context["adminform"].form.errors
    assert not ScheduledTask.objects.exists()


def test_delete_selected_also_deletes_the_periodic_tasks(admin_client):
    rows = [scheduled_task("first"), scheduled_task("second")]
    periodic_ids = [row.periodic_task_id for row in rows]

    admin_client.post(
        changelist("scheduledtask"),
        {"action": "delete_selected", "_selected_action": [row.pk for row in rows], "post": "yes"},
    )

    assert not ScheduledTask.objects.exists()
    assert not PeriodicTask.objects.filter(pk__in=periodic_ids).exists()


def test_delete_view_also_deletes_the_periodic_task(admin_client):
    row = scheduled_task("first")

    admin_client.post(reverse("admin:app_scheduledtask_delete", args=[row.pk]), {"post": "yes"})

    assert not ScheduledTask.objects.exists()
    assert not PeriodicTask.objects.filter(pk=row.periodic_task_id).exists()


# --- ApiToken: the secret is shown once, only its digest is kept -----------------------------------------


def test_adding_a_token_shows_its_secret_once_and_stores_only_the_digest(admin_client, admin_user):
    response = admin_client.post(
        reverse("admin:app_apitoken_add"),
        {"name": "ci", "owner": admin_user.pk, "scope": "read", "is_active": "on"},
        follow=True,
    )

    assert response.status_code == 200
    [secret] = re.findall(r"<code>([\w-]{43})</code>", response.content.decode())
    token = ApiToken.objects.get(name="ci")
    assert token.digest == ApiToken.digest_of(secret)
    assert token.prefix == secret[:8]
    assert secret not in {token.name, token.prefix, token.digest}
    grant = selectors.api_token_grant(secret=secret)
    assert (grant.token_id, grant.scope, grant.owner_id) == (token.pk, "read", admin_user.pk)
    for url in (changelist("apitoken"), change_page(token)):
        assert secret not in admin_client.get(url).content.decode()
