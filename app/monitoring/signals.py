"""The Celery signal handlers that feed the Prometheus metrics (app/monitoring/metrics.py) and
start their servers: the worker's at its start, beat's cluster exporter at beat's start
(app/monitoring/cluster_metrics.py). They log their errors and never fail a task or a publish.
"""

import datetime as dt
import time

from celery import signals

from app import rabbitmq_queues, routing
from app.monitoring import cluster_metrics, metrics
from app.signals import SENT_AT_HEADER, logged_never_raised, run_seconds

_metrics_never_raise = logged_never_raised("Metrics update")


def _eta_timestamp(eta) -> float | None:
    if not eta:
        return None
    if isinstance(eta, str):
        eta = dt.datetime.fromisoformat(eta)
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=dt.UTC)
    return eta.timestamp()


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


@signals.worker_process_shutdown.connect
@_metrics_never_raise
def metrics_child_exit(pid=None, **_):
    metrics.child_exited(pid or 0)


@signals.after_task_publish.connect
@_metrics_never_raise
def metrics_after_publish(headers=None, routing_key=None, **_):
    name = metrics.task_name((headers or {}).get("task"))
    metrics.get().sent.labels(name, rabbitmq_queues.queue_of_routing_key(routing_key)).inc()


@signals.task_received.connect
@_metrics_never_raise
def metrics_task_received(request, **_):
    metrics.get().received.labels(metrics.task_name(request.name), routing.queue_of(request)).inc()


@signals.task_prerun.connect
@_metrics_never_raise
def metrics_task_prerun(task_id, task, **_):
    request = task.request
    name, queue, hostname = metrics.task_name(task.name), routing.queue_of(request), request.hostname or ""
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
    name, queue = metrics.task_name(task.name), routing.queue_of(request)
    m = metrics.get()
    m.runtime.labels(name, queue).observe(seconds)
    m.tasks_active.labels(request.hostname or "").dec()
    if state == "SUCCESS":
        m.succeeded.labels(name, queue).inc()


@signals.task_retry.connect
@_metrics_never_raise
def metrics_task_retry(request, sender=None, **_):
    name = metrics.task_name(getattr(sender, "name", None) or request.task)
    metrics.get().retried.labels(name=name, queue_name=routing.queue_of(request)).inc()


@signals.task_failure.connect
@_metrics_never_raise
def metrics_task_failure(sender=None, exception=None, **_):
    # Also sent by the main process at a hard time limit: the queue is then unknown here.
    request = getattr(sender, "request", None)
    metrics.get().failed.labels(
        name=metrics.task_name(getattr(sender, "name", None)),
        queue_name=routing.queue_of(request),
        exception=type(exception).__name__,
    ).inc()


@signals.task_revoked.connect
@_metrics_never_raise
def metrics_task_revoked(request, sender=None, **_):
    name = metrics.task_name(getattr(sender, "name", None) or getattr(request, "task", None))
    metrics.get().revoked.labels(name=name, queue_name=routing.queue_of(request)).inc()


@signals.task_rejected.connect
@_metrics_never_raise
def metrics_task_rejected(message=None, **_):
    headers = getattr(message, "headers", None) or {}
    metrics.get().rejected.labels(
        name=metrics.task_name(headers.get("task")), queue_name=routing.queue_of(message)
    ).inc()


@signals.task_unknown.connect
@_metrics_never_raise
def metrics_task_unknown(message=None, **_):
    metrics.get().rejected.labels(name=metrics.UNKNOWN, queue_name=routing.queue_of(message)).inc()
