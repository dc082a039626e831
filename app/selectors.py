"""Reads: queries the API, the admin, reports and tasks share."""

import datetime as dt

from celery import states
from django.contrib.auth import get_user_model
from django.db.models import Avg, Count, Max, Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from app import api_tokens
from app.models import FINISHED_STATES, ApiToken, ReportType, TaskLog, TaskState
from project.celery import app as celery_app


def task_log(*, task_id: str) -> TaskLog | None:
    return TaskLog.objects.filter(task_id=task_id).first()


def task_state(*, task_id: str) -> dict | None:
    """A task's state for the API, from one place at a time: the result backend while it keeps
    the task (CELERY_RESULT_EXPIRES), then the history. None for an id never handed out here:
    Celery itself answers PENDING for any id."""
    backend = celery_app.backend
    meta = backend.stored_meta(task_id)
    if meta is not None:
        return _state_from_meta(task_id, meta, backend)
    log = task_log(task_id=task_id)
    return _state_from_log(log) if log is not None else None


def _state_from_meta(task_id: str, meta: dict, backend) -> dict:
    state = meta.get("status") or states.PENDING
    result = meta.get("result")
    body = {
        "task_id": task_id,
        "task_name": meta.get("name") or meta.get("task_name"),
        "state": state,
        "ready": state in FINISHED_STATES,
        "worker": meta.get("worker") or None,
        "queue": meta.get("queue") or None,
        "retries": meta.get("retries"),
        "created_at": _datetime(meta.get("date_created")),
        "started_at": _datetime(meta.get("date_started")),
        "finished_at": _datetime(meta.get("date_done")),
        "duration_seconds": meta.get("runtime"),
        "info": None,
    }
    if state == states.SUCCESS:
        body["result"] = result
    elif state in states.EXCEPTION_STATES:
        body["error"] = repr(backend.exception_to_python(result)) if isinstance(result, dict) else result
    else:
        body["info"] = result if isinstance(result, dict) else None  # PROGRESS: current, total, percent
    return body


def _state_from_log(log: TaskLog) -> dict:
    body = {
        "task_id": log.task_id,
        "task_name": log.task_name,
        "state": log.state,
        "ready": log.is_finished,
        "worker": log.worker or None,
        "queue": log.queue or None,
        "retries": log.retries,
        "created_at": log.created_at,
        "started_at": log.started_at,
        "finished_at": log.finished_at,
        "duration_seconds": log.duration.total_seconds() if log.duration is not None else None,
        "info": None,
    }
    if log.state == TaskState.SUCCESS:
        body["result"] = log.result
    elif log.state in (TaskState.FAILURE, TaskState.REVOKED):
        body["error"] = log.exception or None
    return body


def _datetime(value) -> dt.datetime | None:
    if not value or isinstance(value, dt.datetime):
        return value or None
    return dt.datetime.fromisoformat(value)


def is_known_task_id(*, task_id: str) -> bool:
    """Handed out here: stored in the result backend (queued or later), or in the history."""
    return celery_app.backend.stored_meta(task_id) is not None or TaskLog.objects.filter(task_id=task_id).exists()


def api_token_grant(*, secret: str) -> api_tokens.Grant | None:
    """What the active token `secret` allows, or None (app/api_tokens.py: no database query per
    request, and exact: a disabled or deleted token is refused at once). An expired token still
    has its grant: the caller refuses it, saying why."""
    return api_tokens.grant_for(ApiToken.digest_of(secret))


def user_emails(*, user_ids: list[int]) -> dict[int, str]:
    users = get_user_model().objects.filter(pk__in=user_ids).exclude(email="")
    return dict(users.values_list("pk", "email"))


def _seconds(value: dt.timedelta | None) -> float | None:
    return round(value.total_seconds(), 6) if value is not None else None


def task_overview(*, task_logs=None) -> dict:
    """Counts by state and by task, and average run times, from TaskLog."""
    task_logs = TaskLog.objects.all() if task_logs is None else task_logs
    by_state = {state: 0 for state in TaskState.values}
    for row in task_logs.order_by().values("state").annotate(n=Count("id")):
        by_state[row["state"]] = row["n"]
    by_task = [
        {
            "task_name": row["task_name"],
            "total": row["total"],
            "succeeded": row["succeeded"],
            "failed": row["failed"],
            "average_duration_seconds": _seconds(row["avg_duration"]),
            "max_duration_seconds": _seconds(row["max_duration"]),
        }
        for row in task_logs.order_by("task_name")
        .values("task_name")
        .annotate(
            total=Count("id"),
            succeeded=Count("id", filter=Q(state=TaskState.SUCCESS)),
            failed=Count("id", filter=Q(state=TaskState.FAILURE)),
            avg_duration=Avg("duration"),
            max_duration=Max("duration"),
        )
    ]
    return {"total": sum(by_state.values()), "by_state": by_state, "by_task": by_task}


def _created_between(queryset, filters: dict, field: str):
    since = parse_datetime(filters["since"]) if filters.get("since") else None
    until = parse_datetime(filters["until"]) if filters.get("until") else None
    if since:
        queryset = queryset.filter(**{f"{field}__gte": since})
    if until:
        queryset = queryset.filter(**{f"{field}__lt": until})
    return queryset


def task_summary_report(*, filters: dict) -> dict:
    task_logs = _created_between(TaskLog.objects.all(), filters, "created_at")
    if filters.get("task_name"):
        task_logs = task_logs.filter(task_name=filters["task_name"])
    overview = task_overview(task_logs=task_logs)
    finished = overview["by_state"][TaskState.SUCCESS] + overview["by_state"][TaskState.FAILURE]
    overview["failure_rate"] = overview["by_state"][TaskState.FAILURE] / finished if finished else None
    overview["retried_tasks"] = task_logs.filter(retries__gt=0).count()
    return overview


def user_summary_report(*, filters: dict) -> dict:
    users = _created_between(get_user_model().objects.all(), filters, "date_joined")
    now = timezone.now()
    counts = users.aggregate(
        total=Count("id"),
        active=Count("id", filter=Q(is_active=True)),
        staff=Count("id", filter=Q(is_staff=True)),
        never_logged_in=Count("id", filter=Q(last_login__isnull=True)),
        logged_in_last_30_days=Count("id", filter=Q(last_login__gte=now - dt.timedelta(days=30))),
    )
    newest = users.order_by("-date_joined").values_list("date_joined", flat=True).first()
    counts["newest_joined_at"] = newest.isoformat() if newest else None
    return counts


def report_data(*, report_type: str, filters: dict) -> dict:
    builders = {ReportType.TASK_SUMMARY: task_summary_report, ReportType.USER_SUMMARY: user_summary_report}
    data = builders[ReportType(report_type)](filters=filters)
    data["generated_at"] = timezone.now().isoformat()
    data["filters"] = filters
    return data
