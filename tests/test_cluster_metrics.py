"""Queue lengths and worker up/down from beat (app/monitoring/cluster_metrics.py): a real beat, real workers
and a real broker, read from beat's /metrics; the worker up/down rules on a fake clock."""

import os
import signal
import time
import uuid
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Gauge

from app import rabbitmq_queues
from app.monitoring import cluster_metrics
from project.embedded import EmbeddedRedis, wait_for_port
from tests.conftest import FIGURES, RABBITMQ_GROUP, celery_app_for, wait_until
from tests.processes import start_worker
from tests.resources import free_port
from tests.test_metrics import scrape, value

# kombu's Redis transport: a message of priority p waits in the list of the highest step <= p.
PRIORITY_SEP = "\x06\x16"


@pytest.fixture
def broker_url(redis_url) -> str:
    """A Redis database of this test's own: no other test's worker consumes or purges its queues."""
    return redis_url


@pytest.fixture
def cluster_app(broker_url):
    return celery_app_for(broker_url)


def start_exporter(start_beat, broker_url: str, **env) -> tuple[object, int]:
    """Beat on `broker_url` with its metrics on a free port: (service, port)."""
    port = free_port()
    beat = start_beat(CELERY_BROKER_URL=broker_url, CELERY_METRICS_PORT=port, **env)
    wait_for_port(port, timeout=60, process=beat.process)
    return beat, port


def has_series(samples, metric: str, **labels) -> bool:
    return (metric, frozenset(labels.items())) in samples


def purge(app, queue: str) -> None:
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_queue_length_counts_every_priority_list_and_drops_after_purge(start_beat, cluster_app, broker_url):
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    priorities = [0, 2, 3, 5, 9, 9, 0]
    for i, priority in enumerate(priorities):
        cluster_app.send_task("app.tasks.add", args=(i, 1), queue=queue, priority=priority)
    with cluster_app.connection_for_write() as conn:
        redis = conn.default_channel.client
        # The messages really are spread over the priority lists the exporter must add up.
        assert [redis.llen(key) for key in (queue, f"{queue}{PRIORITY_SEP}3", f"{queue}{PRIORITY_SEP}9")] == [3, 2, 2]

    beat, port = start_exporter(
        start_beat, broker_url, CELERY_EXPORTER_QUEUES=queue, CELERY_EXPORTER_QUEUE_INTERVAL=0.5
    )
    wait_until(
        lambda: value(scrape(port), "celery_queue_length", queue_name=queue) == len(priorities),
        timeout=30,
        message=f"queue length {len(priorities)}:\n{beat.log()[-3000:]}",
    )
    samples = scrape(port)
    # The configured queues are measured too, empty here: nobody publishes to them on this broker.
    assert has_series(samples, "celery_queue_length", queue_name="default")
    assert has_series(samples, "celery_queue_length", queue_name="long")
    assert value(samples, "celery_queue_length", queue_name="long") == 0

    purge(cluster_app, queue)
    wait_until(
        lambda: value(scrape(port), "celery_queue_length", queue_name=queue) == 0,
        timeout=10,
        message="queue length back to 0 after the purge",
    )
    assert has_series(scrape(port), "celery_queue_length", queue_name=queue)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_worker_up_goes_to_0_when_killed_and_away_on_warm_shutdown(
    start_beat, cluster_app, broker_url, service_log_dir
):
    worker_timeout = 10.0  # heartbeats every 2 s: Celery's own rule alone would say 4 s
    beat, port = start_exporter(start_beat, broker_url, CELERY_EXPORTER_WORKER_TIMEOUT=worker_timeout)
    killed = start_worker(cluster_app, broker_url=broker_url, log_dir=service_log_dir, concurrency=1)
    stopped = start_worker(cluster_app, broker_url=broker_url, log_dir=service_log_dir, concurrency=1)
    try:
        for worker in (killed, stopped):
            wait_until(
                lambda worker=worker: value(scrape(port), "celery_worker_up", hostname=worker.hostname) == 1,
                timeout=30,
                message=f"{worker.hostname} up:\n{beat.log()[-3000:]}",
            )
        last_heartbeat = value(
            scrape(port), "django_celery_k8s_worker_last_heartbeat_timestamp_seconds", hostname=killed.hostname
        )
        assert abs(time.time() - last_heartbeat) < 10

        # SIGKILL to the whole group: no worker-offline event, the heartbeats just stop.
        os.killpg(killed.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(
            lambda: value(scrape(port), "celery_worker_up", hostname=killed.hostname) == 0,
            timeout=worker_timeout + 5,
            interval=0.2,
            message=f"killed worker down:\n{beat.log()[-3000:]}",
        )
        # The last heartbeat came about 2 s (one interval) before the kill; the sweep runs every
        # second. Celery's own rule would have said "down" within 5 s.
        down_after = time.monotonic() - killed_at
        FIGURES["celery_worker_up 0 after SIGKILL"] = f"{down_after:.1f} s (timeout {worker_timeout:.0f} s)"
        assert worker_timeout - 4 <= down_after <= worker_timeout + 3
        samples = scrape(port)
        assert value(samples, "celery_worker_up", hostname=stopped.hostname) == 1
        # Kept at 0 (for CELERY_EXPORTER_OFFLINE_WORKER_TTL), with its last heartbeat.
        assert has_series(
            samples, "django_celery_k8s_worker_last_heartbeat_timestamp_seconds", hostname=killed.hostname
        )

        # SIGTERM: warm shutdown, worker-offline: the series go at once, never through 0.
        stopped.stop()
        wait_until(
            lambda: not has_series(scrape(port), "celery_worker_up", hostname=stopped.hostname),
            timeout=3,
            interval=0.2,
            message=f"stopped worker's series removed:\n{beat.log()[-3000:]}",
        )
        samples = scrape(port)
        assert not has_series(
            samples, "django_celery_k8s_worker_last_heartbeat_timestamp_seconds", hostname=stopped.hostname
        )
        assert value(samples, "celery_worker_up", hostname=killed.hostname) == 0
        assert has_series(samples, "celery_worker_up", hostname=killed.hostname)
    finally:
        killed.stop()
        stopped.stop()


@pytest.mark.integration
@RABBITMQ_GROUP
@pytest.mark.django_db(transaction=True)
def test_rabbitmq_queue_length_is_the_passive_declare_count(start_beat, amqp_app):
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    missing = f"never-declared-{uuid.uuid4().hex[:8]}"
    for i in range(5):
        amqp_app.send_task("app.tasks.add", args=(i, 1), queue=queue)
    beat, port = start_exporter(
        start_beat,
        amqp_app.broker_url_for_workers,
        CELERY_EXPORTER_QUEUES=f"{queue},{missing}",
        CELERY_EXPORTER_QUEUE_INTERVAL=0.5,
    )
    try:
        wait_until(
            lambda: value(scrape(port), "celery_queue_length", queue_name=queue) == 5,
            timeout=30,
            message=f"queue length 5:\n{beat.log()[-3000:]}",
        )
        samples = scrape(port)
        # A queue nobody declared reads 0, and does not stop the others from being read.
        assert has_series(samples, "celery_queue_length", queue_name=missing)
        assert value(samples, "celery_queue_length", queue_name=missing) == 0
        assert has_series(samples, "celery_queue_length", queue_name="default")
        assert has_series(samples, "celery_queue_length", queue_name="default.dead-letter")  # quorum queues
        purge(amqp_app, queue)
        wait_until(lambda: value(scrape(port), "celery_queue_length", queue_name=queue) == 0, timeout=10)

        # Worker events over RabbitMQ: a heartbeat makes a worker up, worker-offline removes it.
        hostname = f"fake-{uuid.uuid4().hex[:6]}@localhost"
        with amqp_app.events.default_dispatcher(hostname=hostname) as dispatcher:

            def heartbeat_seen() -> bool:
                dispatcher.send("worker-heartbeat", freq=2.0)
                return value(scrape(port), "celery_worker_up", hostname=hostname) == 1

            wait_until(heartbeat_seen, timeout=20, interval=0.5, message=f"heartbeat seen:\n{beat.log()[-3000:]}")
            dispatcher.send("worker-offline")
        wait_until(lambda: not has_series(scrape(port), "celery_worker_up", hostname=hostname), timeout=5)
    finally:
        with amqp_app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


def exporter_follows(broker_url: str, port: int, queue: str, length: int) -> None:
    """Wait until beat shows `length` messages in `queue` and a heartbeat sent now."""
    app = celery_app_for(broker_url)  # a new one: pooled connections from before an outage are dead
    hostname = f"fake-{uuid.uuid4().hex[:6]}@localhost"

    def seen() -> bool:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send("worker-heartbeat", freq=2.0)
        samples = scrape(port)
        return (
            value(samples, "celery_worker_up", hostname=hostname) == 1
            and has_series(samples, "celery_queue_length", queue_name=queue)
            and value(samples, "celery_queue_length", queue_name=queue) == length
        )

    wait_until(seen, timeout=30, interval=0.5, message=f"{length} in {queue} and {hostname} up")


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_broker_outage_never_stops_beat_and_the_exporter_recovers(start_beat, tmp_path):
    redis = EmbeddedRedis(port=free_port(), workdir=tmp_path)  # not started yet: nothing listens
    broker_url = f"{redis.url}/0"
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    beat, port = start_exporter(
        start_beat,
        broker_url,
        CELERY_EXPORTER_QUEUES=queue,
        CELERY_EXPORTER_QUEUE_INTERVAL=0.5,
        CELERY_BEAT_HEARTBEAT_FILE=tmp_path / "beat-heartbeat",
    )

    def retries_logged() -> tuple[int, int]:
        log = beat.log()
        return log.count("Cannot read queue lengths"), log.count("Lost the worker events")

    try:
        wait_until(lambda: min(retries_logged()) >= 1, timeout=20, message=f"retries logged:\n{beat.log()[-3000:]}")
        # Beat keeps ticking: its last tick moves on (a tick comes at least every 5 s). The retries
        # can be logged before beat's first tick: wait for one, then for a later one.
        first_tick = wait_until(
            lambda: value(scrape(port), "django_celery_k8s_beat_last_tick_timestamp_seconds") or None,
            timeout=15,
            message=f"beat's first tick:\n{beat.log()[-3000:]}",
        )
        wait_until(
            lambda: value(scrape(port), "django_celery_k8s_beat_last_tick_timestamp_seconds") > first_tick > 0,
            timeout=15,
            message=f"beat ticking:\n{beat.log()[-3000:]}",
        )
        assert not has_series(scrape(port), "celery_queue_length", queue_name="default")

        redis.start()
        with celery_app_for(broker_url) as app:
            for i in range(3):
                app.send_task("app.tasks.add", args=(i, 1), queue=queue)
        exporter_follows(broker_url, port, queue, 3)

        # The broker goes away under a connected exporter, and comes back empty (in memory).
        before = retries_logged()
        redis.stop()
        wait_until(
            lambda: all(now > then for now, then in zip(retries_logged(), before, strict=True)),
            timeout=20,
            message=f"the lost broker noticed:\n{beat.log()[-3000:]}",
        )
        redis.start()
        with celery_app_for(broker_url) as app:
            app.send_task("app.tasks.add", args=(0, 1), queue=queue)
        exporter_follows(broker_url, port, queue, 1)
        assert beat.process.poll() is None
    finally:
        redis.stop()


# --- The rules, on a fake clock ------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def states_and_clock():
    registry = CollectorRegistry()
    group = SimpleNamespace(
        worker_up=Gauge("celery_worker_up", "", ["hostname"], registry=registry),
        worker_last_heartbeat=Gauge("last_heartbeat", "", ["hostname"], registry=registry),
    )
    clock = FakeClock()

    def make(**kwargs):
        states = cluster_metrics.WorkerStates(group=group, clock=clock, **kwargs)
        return states, lambda hostname: registry.get_sample_value("celery_worker_up", {"hostname": hostname})

    return make, clock


def test_silent_worker_is_down_after_the_timeout_then_forgotten_after_the_ttl(states_and_clock):
    make, clock = states_and_clock
    states, up = make(timeout=10.0, offline_ttl=60.0)
    states.alive({"hostname": "w1", "freq": 2.0, "timestamp": 1.7e9})
    assert up("w1") == 1
    clock.now += 9.9
    states.sweep()
    assert up("w1") == 1
    clock.now += 0.2
    states.sweep()
    assert up("w1") == 0
    clock.now += 59.0
    states.sweep()
    assert up("w1") == 0
    clock.now += 2.0
    states.sweep()
    assert up("w1") is None
    # A worker that comes back is up again.
    states.alive({"hostname": "w1", "freq": 2.0})
    assert up("w1") == 1


def test_default_timeout_is_celerys_rule_from_the_workers_own_interval(states_and_clock):
    make, clock = states_and_clock
    states, up = make(timeout=None, offline_ttl=60.0)
    states.alive({"hostname": "fast", "freq": 2.0})
    states.alive({"hostname": "slow", "freq": 30.0})
    clock.now += 4.1  # 2 s x HEARTBEAT_EXPIRE_WINDOW / 100
    states.sweep()
    assert (up("fast"), up("slow")) == (0, 1)
    clock.now += 56.0
    states.sweep()
    assert up("slow") == 0


def test_clean_shutdown_removes_the_series_at_once(states_and_clock):
    make, _clock = states_and_clock
    states, up = make(timeout=10.0, offline_ttl=60.0)
    states.alive({"hostname": "w1", "freq": 2.0})
    states.offline({"hostname": "w1"})
    assert up("w1") is None
    states.offline({"hostname": "never-seen"})  # no error for a worker it never knew


def test_queue_names_cover_default_configured_routed_and_extra_queues(cluster_app):
    from kombu import Queue

    cluster_app.conf.task_queues = [Queue("default"), Queue("configured")]
    cluster_app.conf.task_routes = [
        {"x.*": {"queue": "routed"}, "y": {"queue": Queue("routed-queue")}},
        lambda *a: None,
    ]
    assert cluster_metrics.queue_names(cluster_app, ["extra"]) == [
        "configured",
        "default",
        "extra",
        "routed",
        "routed-queue",
    ]
    # A RabbitMQ task queue's dead letters are measured beside it.
    cluster_app.conf.task_queues = [rabbitmq_queues.task_queue("default", delivery_limit=3)]
    assert cluster_metrics.queue_names(cluster_app) == ["default", "default.dead-letter", "routed", "routed-queue"]
