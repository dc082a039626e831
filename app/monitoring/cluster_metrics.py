"""Metrics of the whole Celery cluster, which must come from exactly one process: queue lengths
and worker up/down. Beat runs them (a singleton: one replica, Recreate); a worker cannot report
its own death, and N workers reporting one queue's length would count it N times.

``start`` runs from ``beat_init`` (app/monitoring/signals.py) with the app beat runs with: it serves beat's
default registry on CELERY_METRICS_PORT (its tick and schedule metrics too, app/monitoring/beat_scheduler.py)
and starts two daemon threads, as celery-exporter does:

- queue lengths: every CELERY_EXPORTER_QUEUE_INTERVAL seconds, celery_queue_length{queue_name}
  for every queue the app consumes or routes to, plus CELERY_EXPORTER_QUEUES;
- worker events: celery_worker_up{hostname} is 1 while a worker's heartbeats arrive and 0 once
  they stop (a killed or frozen worker), kept CELERY_EXPORTER_OFFLINE_WORKER_TTL seconds, then
  removed; a worker that shuts down cleanly (worker-offline) is removed at once: a rollout is
  not an outage.

Broker errors are logged and retried with backoff; they never stop beat.
"""

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace

from celery.events.receiver import EventReceiver
from celery.events.state import HEARTBEAT_EXPIRE_WINDOW

from app import rabbitmq_queues
from app.monitoring import metrics

logger = logging.getLogger(__name__)

# celery.worker.heartbeat.Heart's default interval, for events that do not carry theirs.
DEFAULT_HEARTBEAT_FREQ = 2.0
MAX_BACKOFF = 30.0


def start(app) -> None:
    """In beat, once: the worker events thread (worker up/down, and the at-most-once tasks of a
    lost worker: app/lost_tasks.py) and, with CELERY_METRICS_PORT, the metrics server and the
    queue lengths thread."""
    from django.conf import settings
    from prometheus_client import start_http_server

    from app.lost_tasks import LostRuns

    workers = WorkerEvents(
        app,
        WorkerStates(
            timeout=settings.CELERY_EXPORTER_WORKER_TIMEOUT, offline_ttl=settings.CELERY_EXPORTER_OFFLINE_WORKER_TTL
        ),
        lost_runs=LostRuns(app.backend, lost_after=settings.LOST_TASK_AFTER) if settings.LOST_TASK_AFTER else None,
    )
    threading.Thread(target=workers.run, name="worker-events", daemon=True).start()
    port = settings.CELERY_METRICS_PORT
    if not port:
        logger.info("Beat metrics off (CELERY_METRICS_PORT=0): no queue lengths, no worker up/down series")
        return
    start_http_server(port)
    logger.info("Beat metrics on port %s", port)
    queues = QueueLengths(
        app, queue_names(app, settings.CELERY_EXPORTER_QUEUES), settings.CELERY_EXPORTER_QUEUE_INTERVAL
    )
    threading.Thread(target=queues.run, name="queue-lengths", daemon=True).start()


class Backoff:
    """1, 2, 4 ... MAX_BACKOFF seconds between attempts; back to 1 after a success."""

    def __init__(self):
        self.delay = 1.0

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, MAX_BACKOFF)
        return delay

    def reset(self) -> bool:
        """Back to 1 s; True if it was backing off."""
        backing_off, self.delay = self.delay > 1.0, 1.0
        return backing_off


# --- Queue lengths --------------------------------------------------------------------------


def queue_names(app, extra: Iterable[str] = ()) -> list[str]:
    """The default queue, every configured queue and its dead-letter queue (RabbitMQ), every
    queue a route names, and `extra`."""
    conf = app.conf
    names = {conf.task_default_queue, *extra}
    names.update(getattr(queue, "name", queue) for queue in conf.task_queues or ())
    names.update(rabbitmq_queues.dead_letter_queues(conf.task_queues))
    routes = conf.task_routes or ()
    for route_map in routes if isinstance(routes, list | tuple) else [routes]:
        if not isinstance(route_map, Mapping):
            continue  # a router function: its queues cannot be known in advance
        for route in route_map.values():
            queue = route.get("queue") if isinstance(route, Mapping) else None
            if queue:
                names.add(getattr(queue, "name", queue))
    return sorted(name for name in names if name)


def redis_queue_length(channel, name: str) -> int:
    """Messages in a queue of kombu's Redis transport: one list per priority step, named
    ``name`` for step 0 and ``name + sep + step`` for the others (kombu's ``_q_for_pri``).
    The channel's client adds the transport's ``global_keyprefix``."""
    keys = [f"{name}{channel.sep}{step}" if step else name for step in channel.priority_steps]
    with channel.client.pipeline() as pipe:
        for key in keys:
            pipe.llen(key)
        return sum(pipe.execute())


def declared_queue_length(conn, name: str) -> int:
    """Messages in a queue, from a passive declare (RabbitMQ and other AMQP-like brokers)."""
    # A channel of its own: the broker closes a channel whose passive declare fails.
    with conn.channel() as channel:
        try:
            return channel.queue_declare(queue=name, passive=True).message_count
        except conn.channel_errors:
            return 0  # not declared (404): nothing is waiting in it


def queue_lengths(conn, names: Iterable[str]) -> dict[str, int]:
    if conn.transport.driver_type == "redis":
        channel = conn.default_channel
        return {name: redis_queue_length(channel, name) for name in names}
    return {name: declared_queue_length(conn, name) for name in names}


class QueueLengths:
    """Sets celery_queue_length for `names` every `interval` seconds, over one pooled connection."""

    def __init__(self, app, names: list[str], interval: float):
        self.app = app
        self.names = names
        self.interval = interval
        self.gauge = metrics.cluster().queue_length

    def run(self) -> None:
        backoff = Backoff()
        logger.info("Watching the length of queues %s every %s s", ", ".join(self.names), self.interval)
        while True:
            try:
                with self.app.pool.acquire(block=True) as conn:
                    try:
                        while True:
                            conn.ensure_connection(max_retries=0)  # fail fast: this loop retries
                            for name, length in queue_lengths(conn, self.names).items():
                                self.gauge.labels(queue_name=name).set(length)
                            if backoff.reset():
                                logger.info("Reading queue lengths again")
                            time.sleep(self.interval)
                    except Exception:
                        conn.close()  # reconnects on its next use
                        raise
            except Exception as exc:
                delay = backoff.next()
                logger.warning("Cannot read queue lengths (%r); retrying in %.0f s", exc, delay)
                time.sleep(delay)


# --- Worker up/down from heartbeats ---------------------------------------------------------


@dataclass
class _Worker:
    seen: float  # monotonic time of the last heartbeat
    timeout: float
    up: bool = True


class WorkerStates:
    """celery_worker_up and the last heartbeat time per worker, from its events.

    A worker is down once no heartbeat came for `timeout` seconds; None takes Celery's own
    rule (celery.events.state: the worker's heartbeat interval * HEARTBEAT_EXPIRE_WINDOW / 100,
    4 s with the default 2 s heartbeats), the one Flower and ``celery events`` use."""

    def __init__(
        self, *, timeout: float | None, offline_ttl: float, group: SimpleNamespace | None = None, clock=time.monotonic
    ):
        self.timeout = timeout
        self.offline_ttl = offline_ttl
        self.metrics = group or metrics.cluster()
        self.clock = clock
        self.workers: dict[str, _Worker] = {}

    def alive(self, event: dict) -> None:
        """worker-online and worker-heartbeat."""
        hostname = event["hostname"]
        freq = float(event.get("freq") or DEFAULT_HEARTBEAT_FREQ)
        timeout = self.timeout or freq * HEARTBEAT_EXPIRE_WINDOW / 100
        previous = self.workers.get(hostname)
        if previous is not None and not previous.up:
            logger.info("Worker %s is sending heartbeats again", hostname)
        self.workers[hostname] = _Worker(seen=self.clock(), timeout=timeout)
        self.metrics.worker_up.labels(hostname=hostname).set(1)
        self.metrics.worker_last_heartbeat.labels(hostname=hostname).set(float(event.get("timestamp") or time.time()))

    def offline(self, event: dict) -> None:
        """worker-offline: a clean shutdown; the worker's series go at once."""
        hostname = event["hostname"]
        logger.info("Worker %s shut down", hostname)
        self.workers.pop(hostname, None)
        self._remove(hostname)

    def sweep(self) -> None:
        """Mark workers whose heartbeats stopped as down; forget them after the TTL."""
        now = self.clock()
        for hostname, worker in list(self.workers.items()):
            silent = now - worker.seen
            if silent > worker.timeout + self.offline_ttl:
                del self.workers[hostname]
                self._remove(hostname)
            elif silent > worker.timeout and worker.up:
                worker.up = False
                logger.warning("Worker %s sent no heartbeat for %.0f s: down", hostname, silent)
                self.metrics.worker_up.labels(hostname=hostname).set(0)

    def _remove(self, hostname: str) -> None:
        for gauge in (self.metrics.worker_up, self.metrics.worker_last_heartbeat):
            try:
                gauge.remove(hostname)
            except KeyError:
                pass


class _Receiver(EventReceiver):
    """Celery's event receiver, sweeping at least once a second and failing fast on a lost
    broker (WorkerEvents.run reconnects)."""

    connect_max_retries = 0

    def __init__(self, *args, on_iteration, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_iteration = on_iteration

    def on_iteration(self):
        self._on_iteration()


class WorkerEvents:
    """Follows worker events on the broker and keeps `states` up to date, and `lost_runs` (the
    at-most-once runs of lost workers, app/lost_tasks.py) when given."""

    def __init__(self, app, states: WorkerStates, lost_runs=None):
        self.app = app
        self.states = states
        self.lost_runs = lost_runs
        self.backoff = Backoff()

    def _alive(self, event: dict) -> None:
        self.backoff.reset()
        self.states.alive(event)

    def _sweep(self) -> None:
        self.states.sweep()
        if self.lost_runs is not None:
            self.lost_runs.sweep()

    def _handlers(self) -> dict:
        handlers = {
            "worker-online": self._alive,
            "worker-heartbeat": self._alive,
            "worker-offline": self.states.offline,
        }
        if self.lost_runs is None:
            return handlers

        def also_lost_runs(handler):
            def handle(event: dict) -> None:
                self.lost_runs.event(event)
                handler(event)

            return handle

        return {**{kind: also_lost_runs(handler) for kind, handler in handlers.items()}, "*": self.lost_runs.event}

    def run(self) -> None:
        handlers = self._handlers()
        while True:
            try:
                with self.app.connection_for_read() as conn:
                    conn.ensure_connection(max_retries=0)
                    receiver = _Receiver(conn, handlers=handlers, app=self.app, on_iteration=self._sweep)
                    logger.info("Following worker events")
                    if self.lost_runs is not None:
                        self.lost_runs.listening()
                    # wakeup: every worker sends a heartbeat now, so all are known at once.
                    receiver.capture(limit=None, timeout=None, wakeup=True)
            except Exception as exc:
                if self.lost_runs is not None:
                    self.lost_runs.deaf()
                delay = self.backoff.next()
                logger.warning("Lost the worker events (%r); reconnecting in %.0f s", exc, delay)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:
                    self._sweep()  # silent workers still go down while disconnected
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
