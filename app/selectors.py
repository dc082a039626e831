"""Reads: queries the API, the admin, reports and tasks share."""

import datetime as dt

from django.contrib.auth import get_user_model
from django.db.models import Avg, Count, Max, Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django_celery_results.models import TaskResult

from app.models import ApiToken, ReportType, TaskLog, TaskState


def task_log(*, task_id: str) -> TaskLog | None:
    return TaskLog.objects.filter(task_id=task_id).first()


def task_result(*, task_id: str) -> TaskResult | None:
    return TaskResult.objects.filter(task_id=task_id).first()


def is_known_task_id(*, task_id: str) -> bool:
    """Celery answers PENDING for any id; only ids in TaskLog or TaskResult really exist."""
    return TaskLog.objects.filter(task_id=task_id).exists() or TaskResult.objects.filter(task_id=task_id).exists()


def active_api_token(*, secret: str) -> ApiToken | None:
    return ApiToken.objects.filter(digest=ApiToken.digest_of(secret), is_active=True).first()


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
