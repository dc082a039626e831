"""Celery tasks: thin interfaces over app.services and app.selectors.

Each task owns only its delivery guarantee, retries, time limits and failure handling,
and says in its docstring what happens if it runs twice. Only tasks that are safe to
run twice get acks_late with reject_on_worker_lost (redelivered if a worker dies).
"""

import logging
import random
import time

from celery import group, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from app import health, routing, selectors, services
from app.monitoring import metrics, worker_health
from app.task_class import IDEMPOTENT

logger = logging.getLogger(__name__)


# Tasks that run for seconds store a STARTED state (with the worker and start time) when they
# begin; short ones do not: for them it would cost a second result write per task (README).
TRACK_STARTED = {"track_started": True}

# The long queue's tasks run for minutes: limits of their own (the default ones are short).
LONG_LIMITS = {
    "soft_time_limit": settings.CELERY_LONG_TASK_SOFT_TIME_LIMIT,
    "time_limit": settings.CELERY_LONG_TASK_TIME_LIMIT,
}

RETRY_MAX_RETRIES = 5
RETRY_BACKOFF_MAX_SECONDS = settings.CELERY_RETRY_BACKOFF_MAX
# The longest countdown any task here asks for; a Redis visibility timeout must cover it on top
# of the longest hard time limit (app/redelivery.py).
MAX_COUNTDOWN_SECONDS = RETRY_BACKOFF_MAX_SECONDS


class TransientError(Exception):
    """A failure worth retrying (a flaky network call, a busy service)."""


# --- Simple tasks -------------------------------------------------------------------


@shared_task(**IDEMPOTENT)
def add(x: float, y: float) -> float:
    """Return x + y. Delivery: at least once (pure function, safe to repeat)."""
    return x + y


@shared_task(**IDEMPOTENT)
def multiply(x: float, y: float) -> float:
    """Return x * y. Delivery: at least once (pure function, safe to repeat)."""
    return x * y


@shared_task(bind=True)
def debug_task(self) -> dict:
    """Report what the worker sees of this request. Delivery: at most once."""
    request = self.request
    return {
        "task_id": request.id,
        "hostname": request.hostname,
        "queue": routing.queue_of(request) or None,
        "retries": request.retries,
    }


# --- Long-running tasks -------------------------------------------------------------


@shared_task(bind=True, **IDEMPOTENT, **TRACK_STARTED, **LONG_LIMITS)
def long_running_task(self, total_steps: int, step_seconds: float = 1.0) -> dict:
    """Work through `total_steps`, reporting PROGRESS {current, total, percent} after each.

    Delivery: at least once; a redelivered run starts over and produces the same result.
    """
    for step in range(1, total_steps + 1):
        time.sleep(step_seconds)
        self.update_state(
            state="PROGRESS",
            meta={"current": step, "total": total_steps, "percent": round(100 * step / total_steps, 1)},
        )
    return {"current": total_steps, "total": total_steps, "percent": 100.0, "status": "complete"}


@shared_task(bind=True, soft_time_limit=10, time_limit=15, **TRACK_STARTED)
def time_limited_task(self, duration: float, cleanup_seconds: float = 0.0) -> dict:
    """Work for `duration` seconds in 0.1 s steps under a soft (10 s) and hard (15 s) limit.

    At the soft limit it stops, saves what it finished and returns it as a partial result.
    If the clean-up (`cleanup_seconds`) outlasts the hard limit, the worker kills the
    process and the task fails with TimeLimitExceeded. Callers may pass their own
    soft_time_limit/time_limit to apply_async. Delivery: at most once.
    """
    started = time.monotonic()
    steps_done = 0
    try:
        while time.monotonic() - started < duration:
            time.sleep(0.1)
            steps_done += 1
    except SoftTimeLimitExceeded:
        logger.warning("time_limited_task %s hit its soft time limit after %d steps", self.request.id, steps_done)
        time.sleep(cleanup_seconds)
        return {"status": "partial", "steps_done": steps_done, "elapsed": round(time.monotonic() - started, 3)}
    return {"status": "complete", "steps_done": steps_done, "elapsed": round(time.monotonic() - started, 3)}


# --- Retries ----------------------------------------------------------------------


@shared_task(
    bind=True,
    autoretry_for=(TransientError,),
    retry_backoff=True,
    retry_backoff_max=RETRY_BACKOFF_MAX_SECONDS,
    retry_jitter=True,
    max_retries=RETRY_MAX_RETRIES,
    **IDEMPOTENT,
)
def task_with_retry(self, fail_probability: float = 0.5, fail_times: int | None = None) -> dict:
    """Fail with TransientError at random (or for the first `fail_times` attempts) and retry
    with exponential backoff (1, 2, 4 ... s, capped, with full jitter), at most 5 times.

    Delivery: at least once (it has no side effects).
    """
    attempt = self.request.retries
    if fail_times is not None:
        should_fail = attempt < fail_times
    else:
        should_fail = random.random() < fail_probability
    if should_fail:
        raise TransientError(f"simulated transient failure on attempt {attempt + 1}")
    return {"status": "ok", "attempts": attempt + 1}


# --- Database operations --------------------------------------------------------


@shared_task(**IDEMPOTENT, **TRACK_STARTED, **LONG_LIMITS)
def create_users_batch(count: int, prefix: str) -> dict:
    """Create users prefix_00001..prefix_<count> in bulk.

    Delivery: at least once; a second run creates nothing (existing names are skipped).
    """
    return services.create_users_batch(count=count, prefix=prefix)


@shared_task(**IDEMPOTENT, **LONG_LIMITS)
def cleanup_old_users(days: int = 365) -> dict:
    """Delete ordinary users inactive for `days`. Delivery: at least once (deleting twice is a no-op)."""
    return {"deleted": services.cleanup_old_users(days=days)}


@shared_task(**IDEMPOTENT, **LONG_LIMITS)
def cleanup_task_logs(days: int = 30) -> dict:
    """Delete finished TaskLog rows older than `days`. Delivery: at least once (idempotent)."""
    return {"deleted": services.cleanup_task_logs(days=days)}


@shared_task(**IDEMPOTENT)
def delete_expired_idempotency_keys() -> dict:
    """Delete the API's expired idempotency keys. Delivery: at least once (idempotent)."""
    return {"deleted": services.delete_expired_idempotency_keys()}


# --- Email --------------------------------------------------------------------------


@shared_task(
    autoretry_for=(OSError,),
    retry_backoff=True,
    retry_backoff_max=RETRY_BACKOFF_MAX_SECONDS,
    retry_jitter=True,
    max_retries=3,
)
def send_email_task(subject: str, message: str, recipients: list[str]) -> dict:
    """Send one email; connection errors to the mail server are retried with backoff.

    Delivery: at most once per attempt (no acks_late: a redelivery could send the mail twice).
    """
    return {"sent": services.send_email(subject=subject, message=message, recipients=recipients)}


@shared_task(**LONG_LIMITS)
def send_bulk_emails(user_ids: list[int], subject: str, message: str) -> dict:
    """Fan out one send_email_task per user with an address, as a group.

    Delivery: at most once (a redelivery would send every mail again).
    """
    emails = selectors.user_emails(user_ids=user_ids)
    if not emails:
        return {"group_id": None, "task_ids": [], "recipients": 0}
    job = group(send_email_task.s(subject, message, [email]) for email in emails.values())
    result = job.apply_async()
    result.save()
    return {"group_id": result.id, "task_ids": [r.id for r in result.results], "recipients": len(emails)}


# --- Data processing: a chord ---------------------------------------------------------


@shared_task(**IDEMPOTENT)
def process_data_chunk(chunk_id: int, data: list[float]) -> dict:
    """Summarise one chunk (count, sum, min, max): a chord header part. Delivery: at least once."""
    return services.summarise_chunk(chunk_id=chunk_id, data=data)


@shared_task(**IDEMPOTENT)
def aggregate_results(results: list[dict]) -> dict:
    """Chord callback: combine the chunk summaries. Delivery: at least once."""
    return services.combine_chunk_summaries(summaries=results)


# --- Workflow: a chain ------------------------------------------------------------------


@shared_task(**IDEMPOTENT)
def workflow_step_1(value: int) -> int:
    """First link: double the value. Delivery: at least once (pure)."""
    return value * 2


@shared_task(**IDEMPOTENT)
def workflow_step_2(value: int) -> int:
    """Second link: add 10. Delivery: at least once (pure)."""
    return value + 10


@shared_task(**IDEMPOTENT)
def workflow_step_3(value: int) -> dict:
    """Last link: square and report. Delivery: at least once (pure)."""
    return {"input": value, "result": value * value}


# --- Reports ------------------------------------------------------------------------------


@shared_task(bind=True, **IDEMPOTENT, **TRACK_STARTED, **LONG_LIMITS)
def generate_report(self, report_id: int) -> dict:
    """Compute the Report row's content from the database.

    Delivery: at least once; a rerun recomputes and overwrites the same row.
    """
    report = services.generate_report(report_id=report_id)
    return {"report_id": report.pk, "status": report.status}


# --- Monitoring ----------------------------------------------------------------------


# Expires after one canary interval: a canary that waited longer proves nothing fresh, and
# stale ones must not pile up behind a stopped worker.
@shared_task(bind=True, expires=settings.CELERY_CANARY_INTERVAL, **IDEMPOTENT)
def health_check(self) -> dict:
    """Check database, cache, broker and result backend from a worker; fails when unhealthy
    so the failure shows in TaskLog, metrics and alerts. Beat sends it to every worker queue
    as the canary: a success records the time for the worker's readiness
    (app/monitoring/worker_health.py) and the last-success metric. Delivery: at least once
    (read-only)."""
    report = health.run_checks()
    if not report["healthy"]:
        failing = sorted(name for name, check in report["checks"].items() if not check["healthy"])
        # Each failing check's error is in the log (app/health.py); the task's error names them.
        raise RuntimeError(f"unhealthy: {', '.join(failing)}")
    metrics.get().health_check_last_success.labels(queue_name=routing.queue_of(self.request)).set(time.time())
    if self.request.hostname and not self.request.is_eager:  # run by a worker, not in-process
        worker_health.record_canary_success()
    return report
