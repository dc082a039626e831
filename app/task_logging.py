"""Structured logs for Celery. Worker and beat log through Django's LOGGING; every line a task
logs carries its id, name, queue and retry count, plus the request id of the web request (or
the parent task) that enqueued it; and one task_finished line per run gives its state and runtime.
"""

import logging.config

import structlog
from celery import signals as celery_signals
from django.conf import settings
from django.dispatch import receiver
from django_structlog.celery import signals as structlog_signals
from django_structlog.celery.steps import DjangoStructLogInitStep

from app.signals import run_seconds
from project.celery import app as celery_app

logger = structlog.get_logger(__name__)


class TaskContextStep(DjangoStructLogInitStep):
    """django-structlog's worker receivers: each task binds the context found in its headers,
    and every task it publishes (a chain's next step, a chord's callback) carries it on.
    Its publish receivers are dropped: django-structlog's app config already connected its own
    (DJANGO_STRUCTLOG_CELERY_ENABLED), and with both every publish would be logged twice."""

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        celery_signals.before_task_publish.disconnect(self.receiver.receiver_before_task_publish)
        celery_signals.after_task_publish.disconnect(self.receiver.receiver_after_task_publish)


# Imported while the worker loads Django, before it builds its blueprint from these steps.
celery_app.steps["worker"].add(TaskContextStep)

# What a published task carries to its worker; the rest of the context belongs to the sender.
_PROPAGATED = ("request_id", "parent_task_id")


@celery_signals.setup_logging.connect
def use_django_logging(loglevel=None, **_) -> None:
    """Any receiver of this signal stops Celery from configuring logging itself: worker and
    beat keep Django's LOGGING, at the level given on their command line (--loglevel)."""
    logging.config.dictConfig(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)


@receiver(structlog_signals.modify_context_before_task_publish)
def keep_only_propagated_context(context: dict, **_) -> None:
    kept = {key: context[key] for key in _PROPAGATED if key in context}
    context.clear()
    context.update(kept)


@receiver(structlog_signals.bind_extra_task_metadata)
def bind_task_fields(task, **_) -> None:
    request = task.request
    structlog.contextvars.bind_contextvars(
        task_name=task.name,
        queue=(request.delivery_info or {}).get("routing_key"),
        retries=request.retries,
    )


@celery_signals.task_postrun.connect
def log_task_finished(task_id: str, task, state: str | None = None, **_) -> None:
    seconds = run_seconds(task)
    request = task.request
    logger.info(
        "task_finished",
        task_id=task_id,
        task_name=task.name,
        state=state,
        duration_ms=round(seconds * 1000, 3) if seconds is not None else None,
        retries=request.retries,
        queue=(request.delivery_info or {}).get("routing_key"),
    )
    if not request.is_eager:
        # Nothing after this belongs to the task (a solo pool logs its own lines in this thread);
        # an eager call runs inside its caller, whose context (a request's id) stays.
        structlog.contextvars.clear_contextvars()
