"""Celery signal handlers: the clock of each task run, database connection hygiene, and the
Prometheus metrics (app/metrics.py).

The task history (TaskLog) is not kept here: every state the result backend stores reaches
it in the same step (app/result_backend.py), so no handler writes to the database on a task's
path. Metrics handlers log their errors and never fail a task or a publish.
"""

import datetime as dt
import functools
import gc
import logging
import os
import time

from celery import signals
from django.db import close_old_connections

from app import cluster_metrics, history_recorder, lost_tasks, metrics, rabbitmq_queues

logger = logging.getLogger(__name__)


def _logged_never_raised(what: str):
    """A handler decorator: an error is logged as "<what> failed in <handler>", never raised."""

    def decorator(handler):
        @functools.wraps(handler)
        def wrapper(*args, **kwargs):
            try:
                handler(*args, **kwargs)
            except Exception:
                logger.exception("%s failed in %s", what, handler.__name__)

        return wrapper

    return decorator


def _queue_of(request_or_message) -> str:
    delivery_info = getattr(request_or_message, "delivery_info", None) or {}
    return rabbitmq_queues.queue_of_routing_key(delivery_info.get("routing_key"))


# Set on the task's request when it starts; the result backend (run time and start in the
# stored state), metrics and the task_finished log line all read this one clock. Absent where
# no run started in this process (the main process reporting a child killed at its hard time
# limit, or a revoked task).
RUN_STARTED_AT = "run_started_at"
RUN_STARTED_WALL = "run_started_wall"


@signals.task_prerun.connect
def mark_run_started(task, **_):
    request = task.request
    setattr(request, RUN_STARTED_WALL, time.time())
    setattr(request, RUN_STARTED_AT, time.perf_counter())


def run_seconds(task) -> float | None:
    """Seconds since this process started running `task`, or None when it did not."""
    started = getattr(getattr(task, "request", None), RUN_STARTED_AT, None)
    return time.perf_counter() - started if started is not None else None


@signals.task_prerun.connect
def release_stale_connections(task, **_):
    """What Django does at the start of each request: drop connections past CONN_MAX_AGE or
    broken by an error, and health-check the others before their next use (no query until a
    task uses the database). Not for eager calls: they run inside the caller's process,
    perhaps inside its transaction."""
    if not task.request.is_eager:
        close_old_connections()


@signals.worker_init.connect
def wait_out_a_broker_restart_when_publishing(sender=None, **_):
    """In a worker, a publish (a chain's next step, a chord's callback) retries as
    WORKER_TASK_PUBLISH_RETRY_POLICY says instead of the web's half second. The policy is
    changed in place: Celery's task sender holds on to the dict."""
    from django.conf import settings

    sender.app.conf.task_publish_retry_policy.update(settings.WORKER_TASK_PUBLISH_RETRY_POLICY)


@signals.worker_init.connect
def remember_the_worker_process(**_):
    """The main process id the at-most-once runs are recorded with (app/lost_tasks.py): the
    pool processes forked later inherit it."""
    lost_tasks.worker_pid = os.getpid()


# --- Prometheus metrics (app/metrics.py) --------------------------------------------------

# Message header set by the publisher: wall-clock publish time, for the queue-wait histogram
# and the state's date_created.
SENT_AT_HEADER = "sent_at"


_metrics_never_raise = _logged_never_raised("Metrics update")


def _eta_timestamp(eta) -> float | None:
    if not eta:
        return None
    if isinstance(eta, str):
        eta = dt.datetime.fromisoformat(eta)
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=dt.UTC)
    return eta.timestamp()


@signals.worker_init.connect
def freeze_before_the_pool_forks(**_):
    """Worker main process, Django and the tasks imported, the pool not yet forked: every object
    so far moves to a permanent generation, so the pool processes' garbage collections never write
    to (and so copy) the pages they share with it."""
    gc.freeze()


@signals.celeryd_init.connect
@signals.worker_init.connect
@_metrics_never_raise
def metrics_setup_worker(**_):
    # Main process, before the pool forks (celeryd_init when already connected, else worker_init).
    metrics.setup_worker()


@signals.worker_ready.connect
@_metrics_never_raise
def metrics_worker_ready(sender=None, **_):
    from django.conf import settings

    # No celery_worker_up here: a process cannot report its own death. Beat does, from heartbeats.
    metrics.initialize_task_series(sender.app)
    if settings.CELERY_METRICS_PORT:
        metrics.serve_worker(settings.CELERY_METRICS_PORT)


@signals.beat_init.connect
@_metrics_never_raise
def metrics_beat_init(sender=None, **_):
    # Beat's metrics server, queue lengths and worker up/down, with the app beat runs with.
    cluster_metrics.start(sender.app)


@signals.beat_init.connect
@_logged_never_raised("Starting the task history recorder")
def history_recorder_beat_init(sender=None, **_):
    # Beat, a singleton that idles between ticks, folds the history stream into TaskLog.
    history_recorder.start(sender.app)


@signals.worker_process_shutdown.connect
@_metrics_never_raise
def metrics_child_exit(pid=None, **_):
    metrics.child_exited(pid or 0)


@signals.before_task_publish.connect
@_metrics_never_raise
def metrics_before_publish(headers=None, **_):
    if headers is not None:
        headers[SENT_AT_HEADER] = time.time()  # a retry's republish starts a new wait


@signals.before_task_publish.connect
def expire_in_worker(declare=None, exchange=None, properties=None, **_):
    """A task's `expires` on a RabbitMQ queue with a dead-letter queue, or delayed there: no
    message TTL (it would dead-letter the expired message, or end its delay early); the worker
    that receives it late stores it REVOKED (app/rabbitmq_queues.py). Celery passes this dict
    on to the publish."""
    if properties and "expiration" in properties and rabbitmq_queues.expires_in_worker(declare, exchange):
        del properties["expiration"]


@signals.after_task_publish.connect
@_metrics_never_raise
def metrics_after_publish(headers=None, routing_key=None, **_):
    name = metrics.task_name((headers or {}).get("task"))
    metrics.get().sent.labels(name, rabbitmq_queues.queue_of_routing_key(routing_key)).inc()


@signals.task_received.connect
@_metrics_never_raise
def metrics_task_received(request, **_):
    metrics.get().received.labels(metrics.task_name(request.name), _queue_of(request)).inc()


@signals.task_prerun.connect
@_metrics_never_raise
def metrics_task_prerun(task_id, task, **_):
    request = task.request
    name, queue, hostname = metrics.task_name(task.name), _queue_of(request), request.hostname or ""
    m = metrics.get()
    m.started.labels(name, queue).inc()
    m.tasks_active.labels(hostname).inc()
    sent_at = getattr(request, SENT_AT_HEADER, None)
    if sent_at is not None and not request.is_eager:
        eta = _eta_timestamp(request.eta)
        waiting_since = max(float(sent_at), eta) if eta is not None else float(sent_at)
        m.queue_wait.labels(name, queue).observe(max(0.0, time.time() - waiting_since))


@signals.task_postrun.connect
@_metrics_never_raise
def metrics_task_postrun(task, state, **_):
    seconds = run_seconds(task)
    if seconds is None:
        return
    request = task.request
    name, queue = metrics.task_name(task.name), _queue_of(request)
    m = metrics.get()
    m.runtime.labels(name, queue).observe(seconds)
    m.tasks_active.labels(request.hostname or "").dec()
    if state == "SUCCESS":
        m.succeeded.labels(name, queue).inc()


@signals.task_retry.connect
@_metrics_never_raise
def metrics_task_retry(request, sender=None, **_):
    name = metrics.task_name(getattr(sender, "name", None) or request.task)
    metrics.get().retried.labels(name=name, queue_name=_queue_of(request)).inc()


@signals.task_failure.connect
@_metrics_never_raise
def metrics_task_failure(sender=None, exception=None, **_):
    # Also sent by the main process at a hard time limit: the queue is then unknown here.
    request = getattr(sender, "request", None)
    metrics.get().failed.labels(
        name=metrics.task_name(getattr(sender, "name", None)),
        queue_name=_queue_of(request) if request is not None else "",
        exception=type(exception).__name__,
    ).inc()


@signals.task_revoked.connect
@_metrics_never_raise
def metrics_task_revoked(request, sender=None, **_):
    name = metrics.task_name(getattr(sender, "name", None) or getattr(request, "task", None))
    metrics.get().revoked.labels(name=name, queue_name=_queue_of(request)).inc()


@signals.task_rejected.connect
@_metrics_never_raise
def metrics_task_rejected(message=None, **_):
    headers = getattr(message, "headers", None) or {}
    metrics.get().rejected.labels(name=metrics.task_name(headers.get("task")), queue_name=_queue_of(message)).inc()


@signals.task_unknown.connect
@_metrics_never_raise
def metrics_task_unknown(message=None, **_):
    metrics.get().rejected.labels(name=metrics.UNKNOWN, queue_name=_queue_of(message)).inc()
