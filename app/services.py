"""Writes: every change the app makes to the database goes through a function here.

Tasks, signal handlers, API views and the admin stay thin and call these.
"""

import dataclasses
import datetime as dt
import json
import logging
import statistics
from collections.abc import Iterable

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from app import selectors
from app.models import (
    FINISHED_STATES,
    ApiToken,
    IdempotencyKey,
    Report,
    ReportStatus,
    ScheduledTask,
    ScheduleType,
    TaskLog,
    TokenScope,
    format_exception,
)

logger = logging.getLogger(__name__)

# A claimed key whose request stored no answer by then died with its process (gunicorn's
# timeout is 30 s): a retry takes the key over.
IDEMPOTENCY_ABANDONED_AFTER = dt.timedelta(seconds=60)

# --- Task history -------------------------------------------------------------
# TaskLog is written only by app/task_history.py, from the states the result backend stores.


def cleanup_task_logs(*, days: int) -> int:
    """Delete finished task history older than `days`; unfinished rows are kept."""
    cutoff = timezone.now() - dt.timedelta(days=days)
    deleted, _ = TaskLog.objects.filter(state__in=FINISHED_STATES, created_at__lt=cutoff).delete()
    return deleted


# --- Users --------------------------------------------------------------------


def batch_usernames(*, prefix: str, count: int) -> list[str]:
    return [f"{prefix}_{i:05d}" for i in range(1, count + 1)]


@transaction.atomic
def create_users_batch(*, count: int, prefix: str) -> dict:
    """Create users prefix_00001..prefix_<count>. Idempotent: existing names are skipped,
    so a redelivered task creates no duplicates."""
    user_model = get_user_model()
    usernames = batch_usernames(prefix=prefix, count=count)
    existing = set(user_model.objects.filter(username__in=usernames).values_list("username", flat=True))
    new_users = [
        # Demo accounts cannot log in until someone sets a password.
        user_model(username=name, email=f"{name}@example.com", password="!")  # noqa: S106 - Django's unusable-password marker
        for name in usernames
        if name not in existing
    ]
    user_model.objects.bulk_create(new_users, ignore_conflicts=True, batch_size=1000)
    return {"requested": count, "created": len(new_users), "existing": len(existing), "prefix": prefix}


def cleanup_old_users(*, days: int) -> int:
    """Delete ordinary users inactive for `days` (last login, or joining if never logged in)."""
    cutoff = timezone.now() - dt.timedelta(days=days)
    inactive = Q(last_login__lt=cutoff) | Q(last_login__isnull=True, date_joined__lt=cutoff)
    stale = get_user_model().objects.filter(inactive, is_staff=False, is_superuser=False)
    deleted, _ = stale.delete()
    return deleted


# --- Email ----------------------------------------------------------------------


def send_email(*, subject: str, message: str, recipients: list[str]) -> int:
    return send_mail(subject, message, None, recipients, fail_silently=False)


# --- Data processing (chord parts) ----------------------------------------------


def summarise_chunk(*, chunk_id: int, data: list[float]) -> dict:
    return {
        "chunk_id": chunk_id,
        "count": len(data),
        "sum": sum(data),
        "min": min(data) if data else None,
        "max": max(data) if data else None,
    }


def combine_chunk_summaries(*, summaries: list[dict]) -> dict:
    counted = [s for s in summaries if s["count"]]
    total_count = sum(s["count"] for s in summaries)
    total_sum = sum(s["sum"] for s in summaries)
    return {
        "chunks": len(summaries),
        "count": total_count,
        "sum": total_sum,
        "mean": total_sum / total_count if total_count else None,
        "min": min((s["min"] for s in counted), default=None),
        "max": max((s["max"] for s in counted), default=None),
        "chunk_sums_stdev": statistics.pstdev([s["sum"] for s in summaries]) if summaries else None,
    }


# --- Reports --------------------------------------------------------------------


def create_report(*, report_type: str, filters: dict, task_id: str = "") -> Report:
    return Report.objects.create(report_type=report_type, filters=filters, task_id=task_id)


def generate_report(*, report_id: int) -> Report:
    """Compute a report's content from the database and store it on the row."""
    report = Report.objects.get(pk=report_id)
    report.mark_running()
    try:
        data = selectors.report_data(report_type=report.report_type, filters=report.filters)
    except Exception as exc:
        report.mark_failed(format_exception(exc))
        raise
    report.mark_completed(data)
    return report


def fail_report(*, report_id: int, error: str) -> None:
    Report.objects.filter(pk=report_id).update(status=ReportStatus.FAILED, error=error, completed_at=timezone.now())


# --- Schedules (ScheduledTask drives django-celery-beat) ------------------------


DEFAULT_SCHEDULES = [
    {
        "name": "cleanup-task-logs-daily",
        "task": "app.tasks.cleanup_task_logs",
        "schedule_type": ScheduleType.CRONTAB,
        "crontab_minute": "30",
        "crontab_hour": "3",
        "kwargs": {"days": 30},
        "description": "Deletes finished task history older than 30 days.",
    },
    {
        "name": "delete-expired-idempotency-keys-hourly",
        "task": "app.tasks.delete_expired_idempotency_keys",
        "schedule_type": ScheduleType.CRONTAB,
        "crontab_minute": "15",
        "description": "Deletes the API's idempotency keys past IDEMPOTENCY_KEY_TTL_SECONDS.",
    },
    {
        "name": "cleanup-old-users-daily",
        "task": "app.tasks.cleanup_old_users",
        "schedule_type": ScheduleType.CRONTAB,
        "crontab_minute": "45",
        "crontab_hour": "3",
        "kwargs": {"days": 365},
        "description": "Deletes ordinary users inactive for a year.",
    },
]


def validate_scheduled_task(scheduled: ScheduledTask) -> None:
    from project.celery import app as celery_app

    # Task modules are imported lazily (autodiscovery); make sure they are registered.
    celery_app.loader.import_default_modules()
    errors = {}
    if scheduled.task not in celery_app.tasks:
        errors["task"] = f"Unknown task {scheduled.task!r}; registered: app.tasks.*"
    clash = PeriodicTask.objects.filter(name=scheduled.name)
    if scheduled.periodic_task_id:
        clash = clash.exclude(pk=scheduled.periodic_task_id)
    if clash.exists():
        errors["name"] = f"A beat PeriodicTask named {scheduled.name!r} exists already; choose another name."
    if scheduled.schedule_type == ScheduleType.INTERVAL and not scheduled.interval_seconds:
        errors["interval_seconds"] = "An interval schedule needs interval_seconds > 0."
    if not isinstance(scheduled.args, list):
        errors["args"] = "args must be a JSON list."
    if not isinstance(scheduled.kwargs, dict):
        errors["kwargs"] = "kwargs must be a JSON object."
    if errors:
        raise ValidationError(errors)


@transaction.atomic
def save_scheduled_task(scheduled: ScheduledTask) -> ScheduledTask:
    """Save a ScheduledTask and its beat PeriodicTask together; beat sees the change on its next tick."""
    validate_scheduled_task(scheduled)
    periodic = scheduled.periodic_task or PeriodicTask()
    periodic.name = scheduled.name
    periodic.task = scheduled.task
    periodic.args = json.dumps(scheduled.args)
    periodic.kwargs = json.dumps(scheduled.kwargs)
    periodic.queue = scheduled.queue or None
    periodic.enabled = scheduled.enabled
    periodic.description = scheduled.description
    if scheduled.schedule_type == ScheduleType.INTERVAL:
        periodic.interval, _ = IntervalSchedule.objects.get_or_create(
            every=scheduled.interval_seconds, period=IntervalSchedule.SECONDS
        )
        periodic.crontab = None
    else:
        periodic.crontab, _ = CrontabSchedule.objects.get_or_create(
            minute=scheduled.crontab_minute,
            hour=scheduled.crontab_hour,
            day_of_week=scheduled.crontab_day_of_week,
            day_of_month=scheduled.crontab_day_of_month,
            month_of_year=scheduled.crontab_month_of_year,
            timezone="UTC",
        )
        periodic.interval = None
    periodic.full_clean()
    periodic.save()
    scheduled.periodic_task = periodic
    scheduled.save()
    return scheduled


@transaction.atomic
def set_scheduled_tasks_enabled(*, scheduled_tasks: Iterable[ScheduledTask], enabled: bool) -> int:
    changed = 0
    for scheduled in scheduled_tasks:
        if scheduled.enabled != enabled:
            scheduled.enabled = enabled
            save_scheduled_task(scheduled)
            changed += 1
    return changed


@transaction.atomic
def delete_scheduled_task(scheduled: ScheduledTask) -> None:
    if scheduled.periodic_task:
        scheduled.periodic_task.delete()
    scheduled.delete()


def canary_schedules() -> list[dict]:
    """One health_check schedule per worker queue (CELERY_CANARY_QUEUES): the canary every worker pool
    must run to stay ready (app/monitoring/worker_health.py)."""
    return [
        {
            "name": f"health-check-{queue}",
            "task": "app.tasks.health_check",
            "schedule_type": ScheduleType.INTERVAL,
            "interval_seconds": settings.CELERY_CANARY_INTERVAL,
            "queue": queue,
            "description": f"Canary: checks database, cache, broker and result backend from a worker of '{queue}'.",
        }
        for queue in settings.CELERY_CANARY_QUEUES
    ]


def ensure_default_schedules() -> list[str]:
    """Create the default schedules that do not exist yet; never touches edited ones."""
    created = []
    for spec in [*canary_schedules(), *DEFAULT_SCHEDULES]:
        if ScheduledTask.objects.filter(name=spec["name"]).exists():
            continue
        save_scheduled_task(ScheduledTask(**spec))
        created.append(spec["name"])
    return created


# --- API tokens ------------------------------------------------------------------


def issue_api_token(token: ApiToken) -> str:
    """Give a new (unsaved) token its secret and save it; returns the secret, which is shown
    once and never stored: only its digest and first characters are."""
    secret = ApiToken.new_secret()
    token.prefix, token.digest = secret[:8], ApiToken.digest_of(secret)
    token.save()
    return secret


def create_api_token(
    *, name: str, owner, scope: str = TokenScope.ENQUEUE, expires_at: dt.datetime | None = None
) -> tuple[ApiToken, str]:
    token = ApiToken(name=name, owner=owner, scope=scope, expires_at=expires_at)
    return token, issue_api_token(token)


# --- Idempotency keys (app/idempotency.py) --------------------------------------------


@dataclasses.dataclass(frozen=True)
class IdempotencyClaim:
    """What a request with an idempotency key may do: run (``row`` is its claim), answer with
    the stored ``response``, or answer ``conflict`` (409, 422) with ``detail``."""

    row: IdempotencyKey | None = None
    response: dict | None = None
    conflict: int | None = None
    detail: str = ""


def claim_idempotency_key(*, holder: str, key: str, fingerprint: str) -> IdempotencyClaim:
    now = timezone.now()
    # A new claim's fields: a first claim's, and an expired or abandoned one taken over.
    claim = {
        "fingerprint": fingerprint,
        "response": None,
        "created_at": now,
        "expires_at": now + dt.timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL_SECONDS),
    }
    try:
        with transaction.atomic():
            return IdempotencyClaim(row=IdempotencyKey.objects.create(holder=holder, key=key, **claim))
    except IntegrityError:
        pass
    with transaction.atomic():
        row = IdempotencyKey.objects.select_for_update().filter(holder=holder, key=key).first()
        if row is None:  # released or deleted meanwhile: claim it again
            return IdempotencyClaim(row=IdempotencyKey.objects.create(holder=holder, key=key, **claim))
        abandoned = row.response is None and now - row.created_at > IDEMPOTENCY_ABANDONED_AFTER
        if row.expires_at <= now or abandoned:
            for name, value in claim.items():
                setattr(row, name, value)
            row.save()
            return IdempotencyClaim(row=row)
    if row.fingerprint != fingerprint:
        return IdempotencyClaim(
            conflict=422,
            detail=f"The Idempotency-Key {key!r} was used with another request (endpoint or body); "
            "send a new key for a new request.",
        )
    if row.response is None:
        return IdempotencyClaim(
            conflict=409, detail=f"A request with the Idempotency-Key {key!r} is still running; retry in a moment."
        )
    return IdempotencyClaim(response=row.response)


def store_idempotent_answer(row: IdempotencyKey, *, response: dict) -> None:
    IdempotencyKey.objects.filter(pk=row.pk, created_at=row.created_at).update(response=response)


def release_idempotency_key(row: IdempotencyKey) -> None:
    """Give the key back (the request queued nothing): a retry runs for real."""
    IdempotencyKey.objects.filter(pk=row.pk, created_at=row.created_at, response__isnull=True).delete()


def delete_expired_idempotency_keys() -> int:
    deleted, _ = IdempotencyKey.objects.filter(expires_at__lte=timezone.now()).delete()
    return deleted
