"""How long a Redis broker waits before it redelivers a message a worker took and never
acknowledged (the worker died holding it): the visibility timeout, per worker.

A message is unacknowledged while it waits for its countdown (ETA) in a worker and, for an
at-least-once task (acks_late), while it runs. So the timeout must exceed, for every task of the
queues a worker consumes, its longest countdown plus (at least once) its hard time limit; else
Redis hands a live task to a second worker and it runs twice. Anything longer only delays the
redelivery after a worker dies: kombu puts an overdue message back within one restore sweep
(REDIS_RESTORE_INTERVAL) after the timeout.

With CELERY_BROKER_VISIBILITY_TIMEOUT empty (the default), each worker sets the timeout from its
own queues' tasks when it starts (MARGIN_SECONDS above what they need): the default queue's
short tasks give 50 s, the long queue's 380 s. A value that is set is checked against the same
need: too short, and the worker refuses to start. Each chart pool also keeps its unacknowledged
messages under keys of its own (WORKER_POOL_NAME, settings.py), so one pool's short timeout
never redelivers another pool's long tasks.
"""

from celery import signals
from django.conf import settings

# Above the longest need: a clock step, a slow ack.
MARGIN_SECONDS = 5


def needed_seconds(celery_app, queues: set[str] | None = None) -> tuple[float, str]:
    """The longest time a message of these queues (None: all) stays unacknowledged while its
    task is alive, and the task that needs it."""
    from app.routing import routed_queue
    from app.tasks import MAX_COUNTDOWN_SECONDS

    conf = celery_app.conf
    longest, which = float(MAX_COUNTDOWN_SECONDS), "a countdown"
    for name, task in celery_app.tasks.items():
        if name.startswith("celery.") or (queues is not None and routed_queue(name, app=celery_app) not in queues):
            continue
        acks_late = task.acks_late if task.acks_late is not None else conf.task_acks_late
        if not acks_late:
            continue
        hard = task.time_limit or conf.task_time_limit or 0
        if hard + MAX_COUNTDOWN_SECONDS > longest:
            longest, which = hard + MAX_COUNTDOWN_SECONDS, name
    return longest, which


def problem(visibility_timeout: float, celery_app, queues: set[str] | None = None) -> str | None:
    """Why this visibility timeout is too short for these queues' tasks, or None."""
    needed, task = needed_seconds(celery_app, queues)
    if visibility_timeout > needed:
        return None
    return (
        f"the broker visibility timeout ({visibility_timeout:g} s) must exceed {needed:g} s: {task}'s "
        f"hard time limit plus the longest countdown ({settings.CELERY_RETRY_BACKOFF_MAX} s), else Redis "
        "hands a running task to a second worker. Leave CELERY_BROKER_VISIBILITY_TIMEOUT empty to derive it."
    )


@signals.worker_init.connect
def set_visibility_timeout(sender=None, **_) -> None:
    """A starting worker (its queues known, its broker connection not yet made): derive the
    visibility timeout from its queues' tasks, or refuse one that is set too short."""
    if not settings.BROKER_IS_REDIS:
        return
    celery_app = sender.app
    queues = set(celery_app.amqp.queues.consume_from or celery_app.amqp.queues)
    explicit = settings.CELERY_BROKER_VISIBILITY_TIMEOUT
    if explicit is not None:
        reason = problem(explicit, celery_app, queues)
        if reason:
            raise SystemExit(f"worker: {reason}")
        return
    needed, _task = needed_seconds(celery_app, queues)
    options = dict(celery_app.conf.broker_transport_options or {})
    options["visibility_timeout"] = int(needed) + MARGIN_SECONDS
    celery_app.conf.broker_transport_options = options
