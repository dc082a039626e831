"""The app's own Celery signal handlers: the clock of each task run, database connection
hygiene, the worker's and beat's start hooks, and a publish detail of RabbitMQ queues.

The Prometheus metrics' handlers are in app/monitoring/signals.py. The task history (TaskLog)
is not kept here: every state the result backend stores reaches it in the same step
(app/result_backend.py), so no handler writes to the database on a task's path.
"""

import functools
import gc
import logging
import os
import time

from celery import signals
from django.db import close_old_connections

from app import history_recorder, lost_tasks, rabbitmq_queues

logger = logging.getLogger(__name__)


def logged_never_raised(what: str):
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


# Message header set by the publisher: wall-clock publish time, for the state's date_created
# and the queue-wait histogram.
SENT_AT_HEADER = "sent_at"

# Set on the task's request when it starts; the result backend (run time and start in the
# stored state), metrics and the task_finished log line all read this one clock. Absent where
# no run started in this process (the main process reporting a child killed at its hard time
# limit, or a revoked task).
RUN_STARTED_AT = "run_started_at"
RUN_STARTED_WALL = "run_started_wall"


@signals.before_task_publish.connect
def stamp_sent_at(headers=None, **_):
    if headers is not None:
        headers[SENT_AT_HEADER] = time.time()  # a retry's republish starts a new wait


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


@signals.worker_init.connect
def freeze_before_the_pool_forks(**_):
    """Worker main process, Django and the tasks imported, the pool not yet forked: every object
    so far moves to a permanent generation, so the pool processes' garbage collections never write
    to (and so copy) the pages they share with it."""
    gc.freeze()


@signals.beat_init.connect
@logged_never_raised("Starting the task history recorder")
def history_recorder_beat_init(sender=None, **_):
    # Beat, a singleton that idles between ticks, folds the history stream into TaskLog.
    history_recorder.start(sender.app)


@signals.before_task_publish.connect
def expire_in_worker(declare=None, exchange=None, properties=None, **_):
    """A task's `expires` on a RabbitMQ queue with a dead-letter queue, or delayed there: no
    message TTL (it would dead-letter the expired message, or end its delay early); the worker
    that receives it late stores it REVOKED (app/rabbitmq_queues.py). Celery passes this dict
    on to the publish."""
    if properties and "expiration" in properties and rabbitmq_queues.expires_in_worker(declare, exchange):
        del properties["expiration"]
