"""Celery signal handlers that keep TaskLog up to date.

Each handler owns one state change and makes at most one database write for it:
prerun STARTED, postrun SUCCESS, retry RETRY, failure FAILURE, revoked REVOKED.
A bookkeeping error is logged and never fails the task. Metrics and structured logs
hook into these same handlers.
"""

import datetime as dt
import functools
import logging
import time

from celery import signals
from django.db import close_old_connections

from app import services

logger = logging.getLogger(__name__)

# Per-process start times (prefork children each have their own), keyed by task id.
_started_at: dict[str, float] = {}


def _never_raise(handler):
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            handler(*args, **kwargs)
        except Exception:
            logger.exception("TaskLog bookkeeping failed in %s", handler.__name__)

    return wrapper


def _queue_of(request) -> str:
    return (getattr(request, "delivery_info", None) or {}).get("routing_key") or ""


def _runtime(task_id: str) -> dt.timedelta | None:
    started = _started_at.pop(task_id, None)
    return dt.timedelta(seconds=time.perf_counter() - started) if started is not None else None


@signals.task_prerun.connect
def release_stale_connections(task, **_):
    """What Django does at the start of each request: drop connections past CONN_MAX_AGE or
    broken by an error, and health-check the others before their next use. Not for eager
    calls: they run inside the caller's process, perhaps inside its transaction."""
    if not task.request.is_eager:
        close_old_connections()


@signals.task_prerun.connect
@_never_raise
def on_task_prerun(task_id, task, args, kwargs, **_):
    _started_at[task_id] = time.perf_counter()
    request = task.request
    services.record_task_started(
        task_id=task_id,
        task_name=task.name,
        args=list(args or []),
        kwargs=dict(kwargs or {}),
        worker=request.hostname or "",
        queue=_queue_of(request),
        retries=request.retries or 0,
    )


@signals.task_postrun.connect
@_never_raise
def on_task_postrun(task_id, task, retval, state, **_):
    if state != "SUCCESS":
        # FAILURE and RETRY are written by their own handlers, with the exception.
        _started_at.pop(task_id, None)
        return
    services.record_task_succeeded(task_id=task_id, result=retval, duration=_runtime(task_id))


@signals.task_retry.connect
@_never_raise
def on_task_retry(request, reason, **_):
    services.record_task_retried(task_id=request.id, reason=reason)


@signals.task_failure.connect
@_never_raise
def on_task_failure(task_id, exception, einfo=None, **_):
    # Also sent by the worker's main process when it kills a task at its hard time limit;
    # there no start time is known in process, and the database computes the run time.
    services.record_task_failed(
        task_id=task_id,
        exception=exception,
        traceback=str(einfo.traceback) if einfo is not None else "",
        duration=_runtime(task_id),
    )


@signals.task_revoked.connect
@_never_raise
def on_task_revoked(request, sender=None, **_):
    services.record_task_revoked(task_id=request.id, task_name=getattr(sender, "name", "") or request.task or "")
