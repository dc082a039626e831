"""The files a Celery worker keeps for its Kubernetes probes, so the probes are a `stat`, not a
`celery inspect ping` (no Django import, no broker round trip).

In ``settings.CELERY_WORKER_HEALTH_DIR``:

- ``alive``: touched by the main process's event loop every CELERY_WORKER_HEALTH_INTERVAL seconds,
  every second while it waits to reconnect to the broker, and by a thread during a shutdown. Stale: the main loop is stuck
  or gone, or the worker has been connected without consuming from its queues for
  CELERY_WORKER_STUCK_AFTER seconds (a restart is what heals that). Busy pool processes do not
  matter: they are other processes.
- ``ready``: touched on the same tick while the worker is connected, consuming from every one
  of its queues, and its canary is fresh or every pool slot is busy; removed otherwise. Its
  content says which ("free" or "busy").
- ``canary``: touched by a pool process each time the health_check task succeeds; set to the
  start time when the worker starts, so a new worker gets CELERY_CANARY_STALE_AFTER seconds to
  receive its first one.
"""

import logging
import threading
import time
from pathlib import Path

from celery import bootsteps, signals
from celery.worker import state
from celery.worker.consumer import Consumer as CeleryConsumer

logger = logging.getLogger(__name__)

ALIVE, READY, CANARY = "alive", "ready", "canary"


def health_dir() -> Path:
    from django.conf import settings

    return Path(settings.CELERY_WORKER_HEALTH_DIR)


def touch(name: str, content: str | None = None) -> None:
    path = health_dir() / name
    if content is None:
        path.touch()
    else:
        # Written whole then renamed: a probe never reads half a file.
        partial = path.with_name(f".{name}.partial")
        partial.write_text(content)
        partial.replace(path)


def remove(name: str) -> None:
    (health_dir() / name).unlink(missing_ok=True)


def age(name: str, now: float | None = None) -> float | None:
    """Seconds since the file was last written; None if it does not exist."""
    try:
        mtime = (health_dir() / name).stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - mtime


def record_canary_success() -> None:
    """In the pool process that ran health_check successfully."""
    touch(CANARY)


def readiness(
    *, connected: bool, consuming: bool, busy: bool, canary_age: float | None, stale_after: float
) -> str | None:
    """The content of the ready file ("free" or "busy"), or None when the worker is not ready."""
    if not (connected and consuming):
        return None
    if busy:
        return "busy"
    if stale_after <= 0 or (canary_age is not None and canary_age <= stale_after):
        return "free"  # stale_after 0: no canary is scheduled (no beat), so none is awaited
    return None


class HealthFiles(bootsteps.StartStopStep):
    """Consumer step: runs while the consumer is connected (stopped on connection loss and
    started again after the reconnect), writing the files on the event loop's timer."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.timer_entry = None
        self.was_ready: bool | None = None
        # Since when the worker is connected but not consuming from its queues (monotonic).
        self.stuck_since: float | None = None
        # Once per worker start: no ready file left by a previous run in the same pod, and the
        # canary clock starts now.
        health_dir().mkdir(parents=True, exist_ok=True)
        remove(READY)
        touch(CANARY)
        touch(ALIVE)

    def start(self, c):
        from django.conf import settings

        health_dir().mkdir(parents=True, exist_ok=True)
        touch(ALIVE)
        # The first tick runs once the event loop has started consuming.
        self.timer_entry = c.timer.call_repeatedly(settings.CELERY_WORKER_HEALTH_INTERVAL, self.tick, (c,), priority=10)

    def tick(self, c) -> None:
        from django.conf import settings

        try:
            connection = c.connection
            connected = connection is not None and connection.connected
            queues = c.app.amqp.queues.consume_from or {}
            consuming = c.task_consumer is not None and all(c.task_consumer.consuming_from(q) for q in queues)
            consuming = consuming and bool(queues)
            if self.still_alive(connected=connected, consuming=consuming, queues=queues):
                touch(ALIVE)
            verdict = readiness(
                connected=connected,
                consuming=consuming,
                busy=len(state.active_requests) >= (c.pool.num_processes or 1),
                canary_age=age(CANARY),
                stale_after=settings.CELERY_CANARY_STALE_AFTER,
            )
            if verdict is None:
                remove(READY)
            else:
                touch(READY, verdict)
            if self.was_ready != (verdict is not None):
                logger.log(
                    logging.INFO if verdict else logging.WARNING,
                    "Worker readiness: %s (consuming=%s, canary age=%s s)",
                    verdict or "not ready",
                    consuming,
                    age(CANARY),
                )
                self.was_ready = verdict is not None
        except Exception:
            # A probe file that cannot be written must not take the event loop down.
            logger.exception("Could not update the worker's probe files")

    def still_alive(self, *, connected: bool, consuming: bool, queues) -> bool:
        """False once the worker has been connected without consuming for CELERY_WORKER_STUCK_AFTER
        seconds: nothing but a restart brings it back then. A broker outage (not connected) never
        counts: a restart would not help, and the reconnect loop keeps the worker alive."""
        from django.conf import settings

        if not connected or consuming:
            if self.stuck_since is not None and consuming:
                logger.warning("Worker consuming again from %s", ", ".join(sorted(queues)))
            self.stuck_since = None
            return True
        now = time.monotonic()
        if self.stuck_since is None:
            self.stuck_since = now
        stuck_for = now - self.stuck_since
        if settings.CELERY_WORKER_STUCK_AFTER <= 0 or stuck_for < settings.CELERY_WORKER_STUCK_AFTER:
            return True
        if (
            stuck_for - settings.CELERY_WORKER_STUCK_AFTER < settings.CELERY_WORKER_HEALTH_INTERVAL
        ):  # once, on the first tick past it
            logger.error(
                "Worker connected but not consuming from all of its queues (%s) for %d s: no longer marked "
                "alive, so its liveness probe fails and it is restarted",
                ", ".join(sorted(queues)) or "none left",
                stuck_for,
            )
        return False

    def stop(self, c):
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        remove(READY)
        self.was_ready = None

    def shutdown(self, c):
        self.stop(c)


_shutdown_keepalive: threading.Thread | None = None


@signals.worker_shutting_down.connect
def keep_alive_while_shutting_down(**_) -> None:
    """Main process, on SIGTERM (or another shutdown signal): the event loop stops on purpose
    while running tasks finish, up to the pod's grace period; a thread keeps ``alive`` fresh, so
    a kubelet that still probes a terminating pod does not cut the warm shutdown short."""
    global _shutdown_keepalive
    from django.conf import settings

    if _shutdown_keepalive is not None:
        return
    interval = settings.CELERY_WORKER_HEALTH_INTERVAL

    def touch_until_exit():
        while True:
            try:
                touch(ALIVE)
            except OSError:
                logger.exception("Could not touch the worker's alive file")
            time.sleep(interval)

    _shutdown_keepalive = threading.Thread(target=touch_until_exit, name="alive-during-shutdown", daemon=True)
    _shutdown_keepalive.start()


class Consumer(CeleryConsumer):
    """Celery's consumer, marking the worker alive while it waits for the broker.

    While the broker is unreachable the main process sits in kombu's reconnect loop instead of
    the event loop, so the timer does not run; kombu calls the loop's ``callback`` every second
    of its waits, and this one touches ``alive`` before calling Celery's own.

    On RabbitMQ with quorum queues its delayed-delivery step declares every task queue before
    binding them (app/delayed_delivery.py)."""

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [
            "app.delayed_delivery:DelayedDelivery" if step.endswith(":DelayedDelivery") else step
            for step in CeleryConsumer.Blueprint.default_steps
        ]

    def ensure_connected(self, conn):
        ensure_connection = conn.ensure_connection

        def ensure_connection_marking_alive(*args, callback=None, **kwargs):
            def alive_then_callback():
                try:
                    touch(ALIVE)
                except OSError:
                    logger.exception("Could not touch the worker's alive file")
                if callback is not None:
                    callback()

            return ensure_connection(*args, callback=alive_then_callback, **kwargs)

        conn.ensure_connection = ensure_connection_marking_alive
        return super().ensure_connected(conn)
