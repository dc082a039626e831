"""Prometheus metrics of Celery tasks and workers, with celery-exporter's names and labels.

The celery-mixin dashboards and alerts query these names unchanged. Labels stay bounded:
task names only from registered tasks (anything else is "unknown"), the queue name, the
exception class name; no task ids. Workers label tasks active with their hostname; worker
up/down and queue lengths come from beat alone (``cluster``, app/monitoring/cluster_metrics.py).

Prefork: every pool child counts into its own file under ``PROMETHEUS_MULTIPROC_DIR``
(prometheus-client multiprocess mode) and the worker's main process serves the sum on
``CELERY_METRICS_PORT``. prometheus-client picks its value class when it is imported,
from that environment variable, so the metric objects here are created lazily: the
worker's main process first sets the variable, empties the directory and switches the
value class (``setup_worker``, from ``celeryd_init``, before the pool forks), then
creates them. Any other process (web, tests, ``manage.py``) creates them on first use
in whatever mode its environment chose.
"""

import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace

from app import routing

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"

_lock = threading.Lock()
_groups: dict[str, SimpleNamespace] = {}  # metric groups by name, each created on first use
_multiprocess_dir: str | None = None

# celery-exporter's buckets (seconds).
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30, 60, 120, 300, 600)
QUEUE_WAIT_BUCKETS = RUNTIME_BUCKETS


def _create() -> SimpleNamespace:
    from prometheus_client import Counter, Gauge, Histogram

    task_labels = ["name", "queue_name"]
    return SimpleNamespace(
        sent=Counter("celery_task_sent", "Tasks published.", task_labels),
        received=Counter("celery_task_received", "Tasks received by a worker.", task_labels),
        started=Counter("celery_task_started", "Tasks started by a worker.", task_labels),
        succeeded=Counter("celery_task_succeeded", "Tasks that succeeded.", task_labels),
        failed=Counter("celery_task_failed", "Tasks that failed.", [*task_labels, "exception"]),
        retried=Counter("celery_task_retried", "Tasks that asked to be retried.", task_labels),
        revoked=Counter("celery_task_revoked", "Tasks revoked.", task_labels),
        rejected=Counter("celery_task_rejected", "Tasks rejected (unknown or invalid messages).", task_labels),
        runtime=Histogram("celery_task_runtime", "Task run time (s).", task_labels, buckets=RUNTIME_BUCKETS),
        queue_wait=Histogram(
            "celery_task_queue_wait_time",
            "Seconds from publish (or ETA/countdown) to start.",
            task_labels,
            buckets=QUEUE_WAIT_BUCKETS,
        ),
        # Changed by every pool child; the sum over live processes is the worker's figure.
        tasks_active=Gauge(
            "celery_worker_tasks_active", "Tasks running now.", ["hostname"], multiprocess_mode="livesum"
        ),
        # Set by the pool process that ran a successful health_check (the canary); "max" keeps
        # the latest over processes, and the value survives the process that set it.
        health_check_last_success=Gauge(
            "django_celery_k8s_health_check_last_success_timestamp_seconds",
            "Unix time of the last successful health_check (canary) on this queue.",
            ["queue_name"],
            multiprocess_mode="max",
        ),
    )


def _group(name: str, create) -> SimpleNamespace:
    """The metric group `name`, made by `create()` the first time any thread asks for it."""
    group = _groups.get(name)
    if group is None:
        with _lock:
            group = _groups.get(name)
            if group is None:
                group = _groups[name] = create()
    return group


def get() -> SimpleNamespace:
    """The task and worker metric objects, created on first use."""
    return _group("worker", _create)


def multiprocess_dir() -> str:
    """This worker's directory: ``worker`` under the base (gunicorn uses ``web``, see
    project/gunicorn_conf.py), so a web server and a worker on one host never share files."""
    from django.conf import settings

    return str(Path(settings.PROMETHEUS_MULTIPROC_BASE_DIR) / "worker")


def setup_worker() -> None:
    """In the worker's main process before the pool forks: multiprocess mode in an empty
    directory of this worker's own. Idempotent."""
    global _multiprocess_dir
    if _multiprocess_dir is not None:
        return
    if "worker" in _groups:
        logger.warning("Metrics were created before the worker set up multiprocess mode; prefork sums may be wrong")
    path = Path(multiprocess_dir())
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # only prometheus-client's files, whatever the directory is
        stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus-client was imported (by some library) before the variable was set.
        values.ValueClass = values.MultiProcessValue()
    _multiprocess_dir = str(path)
    get()


def serve_worker(port: int) -> None:
    """Serve the sum over all of this worker's processes on ``port`` (main process only)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=_multiprocess_dir or multiprocess_dir())
    start_http_server(port, registry=registry)
    logger.info("Worker metrics on port %s", port)


def child_exited(pid: int) -> None:
    """A pool child exits: drop its live gauges (its counters and histograms stay summed)."""
    if _multiprocess_dir is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, _multiprocess_dir)


# --- Beat (app/monitoring/beat_scheduler.py) ----------------------------------------------
# Beat is one process: these live in the default registry, served by beat on CELERY_METRICS_PORT.


def _create_beat() -> SimpleNamespace:
    from prometheus_client import Counter, Gauge

    return SimpleNamespace(
        last_tick=Gauge(
            "django_celery_k8s_beat_last_tick_timestamp_seconds",
            "Unix time of the beat scheduler's last completed tick.",
        ),
        runs=Counter("django_celery_k8s_beat_schedule_runs", "Schedule entries that sent their task.", ["name"]),
        errors=Counter(
            "django_celery_k8s_beat_schedule_errors", "Schedule entries whose task could not be sent.", ["name"]
        ),
    )


def beat() -> SimpleNamespace:
    """Beat's metric objects, created on first use."""
    return _group("beat", _create_beat)


# --- Cluster (app/monitoring/cluster_metrics.py) ------------------------------------------
# Only beat sets these: one source for the whole cluster. Default registry, served by beat.


def _create_cluster() -> SimpleNamespace:
    from prometheus_client import Gauge

    return SimpleNamespace(
        queue_length=Gauge("celery_queue_length", "Messages waiting in the queue.", ["queue_name"]),
        worker_up=Gauge(
            "celery_worker_up",
            "1 while the worker's heartbeats arrive, 0 once they stopped (killed or frozen).",
            ["hostname"],
        ),
        worker_last_heartbeat=Gauge(
            "django_celery_k8s_worker_last_heartbeat_timestamp_seconds",
            "Unix time of the worker's last heartbeat event.",
            ["hostname"],
        ),
    )


def cluster() -> SimpleNamespace:
    """Queue lengths and worker up/down, created on first use."""
    return _group("cluster", _create_cluster)


# --- Task history recorder (app/history_recorder.py) ---------------------------------------
# Set by the recorder (in beat); default registry, served by beat.


def _create_history() -> SimpleNamespace:
    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        entries=Counter("django_celery_k8s_task_history_entries", "Stored task states written to the history."),
        rows=Counter("django_celery_k8s_task_history_rows_written", "TaskLog rows inserted or updated."),
        undecodable=Counter(
            "django_celery_k8s_task_history_undecodable_entries", "History stream entries that were not a task state."
        ),
        lag=Histogram(
            "django_celery_k8s_task_history_lag_seconds",
            "Seconds from a state being stored to its TaskLog row being written.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
        ),
        backlog=Gauge(
            "django_celery_k8s_task_history_backlog",
            "Stored task states not yet written to TaskLog (unread or unacknowledged stream entries).",
        ),
        last_batch=Gauge(
            "django_celery_k8s_task_history_last_batch_timestamp_seconds",
            "Unix time the recorder last wrote a batch to TaskLog.",
        ),
    )


def history() -> SimpleNamespace:
    """The history recorder's metrics, created on first use."""
    return _group("history", _create_history)


def initialize_task_series(app) -> None:
    """Create each registered task's counter series at 0, on its routed queue (worker main
    process, at start). A labelled series otherwise appears only at its first increment, and
    rate()/increase() cannot see that first step: a task that fails once after a restart would
    never show in CeleryTaskHighFailRate's window. Failures are left out: their exception
    label is unknown until one happens."""
    m = get()
    counters = (m.sent, m.received, m.started, m.succeeded, m.retried, m.revoked, m.rejected)
    for name in sorted(app.tasks):
        if name.startswith("celery."):  # Celery's internal tasks (chord_unlock, backend_cleanup...)
            continue
        queue = routing.routed_queue(name, app=app)
        for counter in counters:
            counter.labels(name=name, queue_name=queue)
    m.rejected.labels(name=UNKNOWN, queue_name=app.conf.task_default_queue)


_registered: set[str] = set()


def task_name(name: str | None) -> str:
    """A registered task's name, else "unknown": labels stay bounded."""
    if name in _registered:  # on every task: a set lookup, not the app's registry behind a proxy
        return name
    if not name:
        return UNKNOWN
    from celery import current_app

    if name in current_app.tasks:
        _registered.add(name)
        return name
    return UNKNOWN
