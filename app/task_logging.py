"""Structured logs for Celery. Worker and beat log through Django's LOGGING; every line a task
logs carries its id, name, queue and retry count, plus the request id of the web request (or
the parent task) that enqueued it; and one task_finished line per run gives its state, runtime
and, for a retry or a failure, the exception (Celery's own per-task lines only with
LOG_CELERY_TASK_LINES: project/logging_config.py).
"""

import logging.config
import warnings

import structlog
from billiard.exceptions import WorkerLostError
from celery import bootsteps
from celery import signals as celery_signals
from celery.exceptions import TimeLimitExceeded
from django.conf import settings
from django.dispatch import receiver
from django_structlog.celery import signals as structlog_signals
from django_structlog.celery.receivers import CeleryReceiver

from app import routing
from app.signals import run_seconds
from project.celery import app as celery_app

logger = structlog.get_logger(__name__)


class TaskFailureLogStep(bootsteps.Step):
    """django-structlog's worker receivers for what goes wrong: retries, failures, revokes,
    unknown and rejected messages each log a line. A run's context is bound by
    bind_task_context below instead of its prerun receiver (one call; measured, a tenth of a
    trivial task's pool-process time went to its receivers and signals), and its publish
    receivers are connected once already by its app config (DJANGO_STRUCTLOG_CELERY_ENABLED)."""

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.receiver = CeleryReceiver()
        celery_signals.task_retry.connect(self.receiver.receiver_task_retry)
        celery_signals.task_failure.connect(self.receiver.receiver_task_failure)
        celery_signals.task_revoked.connect(self.receiver.receiver_task_revoked)
        celery_signals.task_unknown.connect(self.receiver.receiver_task_unknown)
        celery_signals.task_rejected.connect(self.receiver.receiver_task_rejected)


# Imported while the worker loads Django, before it builds its blueprint from these steps.
celery_app.steps["worker"].add(TaskFailureLogStep)

# The header django-structlog's publish receiver fills with the sender's context.
CONTEXT_HEADER = "__django_structlog__"
EXCEPTION_MAX_CHARS = 500

# What a published task carries to its worker; the rest of the context belongs to the sender.
_PROPAGATED = ("request_id", "parent_task_id")


@celery_signals.setup_logging.connect
def use_django_logging(loglevel=None, **_) -> None:
    """Any receiver of this signal stops Celery from configuring logging itself: worker and
    beat keep Django's LOGGING, at the level given on their command line (--loglevel)."""
    logging.config.dictConfig(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)


# Celery warns at every broker connection loss that this setting's default changes in Celery 6.
CANCEL_ON_CONNECTION_LOSS_WARNING = r"(?s).*worker_cancel_long_running_tasks_on_connection_loss"


@celery_signals.celeryd_after_setup.connect
def quiet_the_cancel_on_connection_loss_warning(conf=None, **_) -> None:
    """Off on purpose on Redis (settings.py says why): no warning about it at every reconnect.
    Added after Celery's own set-up, whose 'always' filter for its deprecation warnings would
    otherwise take precedence."""
    if not (conf or celery_app.conf).worker_cancel_long_running_tasks_on_connection_loss:
        warnings.filterwarnings("ignore", message=CANCEL_ON_CONNECTION_LOSS_WARNING)


@receiver(structlog_signals.modify_context_before_task_publish)
def keep_only_propagated_context(context: dict, **_) -> None:
    kept = {key: context[key] for key in _PROPAGATED if key in context}
    context.clear()
    context.update(kept)


@celery_signals.task_prerun.connect
def bind_task_context(task_id: str, task, **_) -> None:
    """Every line this run logs carries the task's id, name, queue and retries, and the request id
    (and parent task id) it was published with; with LOG_CELERY_TASK_LINES a task_started line."""
    request = task.request
    if request.is_eager:
        return  # run inside its caller, whose context (a request's id) stays
    context = dict(getattr(request, CONTEXT_HEADER, None) or {})
    context.update(
        task_id=task_id,
        task_name=task.name,
        queue=routing.queue_of(request) or None,
        retries=request.retries,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)
    if settings.LOG_CELERY_TASK_LINES:
        logger.info("task_started")


@celery_signals.task_postrun.connect
def log_task_finished(task_id: str, task, state: str | None = None, retval=None, **_) -> None:
    request = task.request
    if state is None:
        # Stopped from outside (SIGTERM at a hard time limit or a revoke): the worker's main process
        # logs how it ended, task_finished FAILURE below or django-structlog's task_revoked.
        if not request.is_eager:
            structlog.contextvars.clear_contextvars()
        return
    seconds = run_seconds(task)
    fields = {}
    if isinstance(retval, BaseException):  # a retry's reason, or the failure
        fields["exception"] = repr(retval)[:EXCEPTION_MAX_CHARS]
    logger.info(
        "task_finished",
        task_id=task_id,
        task_name=task.name,
        state=state,
        duration_ms=round(seconds * 1000, 3) if seconds is not None else None,
        retries=request.retries,
        queue=routing.queue_of(request) or None,
        **fields,
    )
    if not request.is_eager:
        # Nothing after this belongs to the task (a solo pool logs its own lines in this thread);
        # an eager call runs inside its caller, whose context (a request's id) stays.
        structlog.contextvars.clear_contextvars()


@celery_signals.task_failure.connect
def log_task_killed(sender=None, task_id: str | None = None, exception=None, **_) -> None:
    """The task_finished line of a run whose pool process ended without finishing it: killed at
    its hard time limit, or lost (WorkerLostError). The worker's main process fails the task
    then, and no task_postrun runs; its run time and queue are not known there."""
    if not isinstance(exception, TimeLimitExceeded | WorkerLostError):
        return
    logger.info(
        "task_finished",
        task_id=task_id,
        task_name=getattr(sender, "name", None),
        state="FAILURE",
        exception=repr(exception)[:EXCEPTION_MAX_CHARS],
    )
