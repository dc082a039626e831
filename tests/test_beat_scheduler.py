"""Beat's scheduler: the heartbeat file and tick gauge on every tick that completes, and one run
(or error) counted per schedule entry sent (or not sent)."""

import os
import time
import uuid

import pytest
import redis
from celery.beat import ScheduleEntry, Scheduler, SchedulingError
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler as BaseDatabaseScheduler
from prometheus_client import REGISTRY

from app.monitoring.beat_scheduler import DatabaseScheduler
from project.celery import app as celery_app
from project.embedded import wait_for_port
from tests.conftest import http, wait_until
from tests.resources import free_port
from tests.test_web_metrics import samples, total

pytestmark = pytest.mark.django_db(transaction=True)

LAST_TICK = "django_celery_k8s_beat_last_tick_timestamp_seconds"
RUNS = "django_celery_k8s_beat_schedule_runs_total"
ERRORS = "django_celery_k8s_beat_schedule_errors_total"


def sample(metric: str, **labels) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


@pytest.fixture
def heartbeat(tmp_path, settings):
    settings.CELERY_BEAT_HEARTBEAT_FILE = str(tmp_path / "run" / "beat-heartbeat")
    return tmp_path / "run" / "beat-heartbeat"


@pytest.fixture
def scheduler():
    celery_app.loader.import_default_modules()  # the tasks, as beat imports them at its start
    return DatabaseScheduler(app=celery_app)


@pytest.fixture
def unconsumed_queue():
    """A queue no worker consumes, so sent tasks stay countable; deleted afterwards."""
    name = f"beat-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    yield name, client
    client.delete(name)


def test_a_tick_with_nothing_due_touches_the_heartbeat(scheduler, heartbeat):
    started = time.time()

    scheduler.tick()

    assert heartbeat.stat().st_mtime >= started - 1  # file systems may round down
    assert sample(LAST_TICK) >= started


def test_a_tick_that_raises_touches_nothing(scheduler, heartbeat, monkeypatch):
    scheduler.tick()
    long_ago = time.time() - 3600
    os.utime(heartbeat, (long_ago, long_ago))
    last_tick = sample(LAST_TICK)

    def broken_tick(self, *args, **kwargs):
        raise RuntimeError("database gone")

    monkeypatch.setattr(BaseDatabaseScheduler, "tick", broken_tick)
    with pytest.raises(RuntimeError):
        scheduler.tick()

    assert heartbeat.stat().st_mtime == pytest.approx(long_ago)
    assert sample(LAST_TICK) == last_tick


def entry(task: str, queue: str) -> ScheduleEntry:
    return ScheduleEntry(
        name=f"entry-{uuid.uuid4().hex[:6]}", task=task, args=(2, 3), options={"queue": queue}, app=celery_app
    )


def test_each_sent_entry_counts_as_a_run_labelled_by_task(scheduler, unconsumed_queue):
    queue, broker = unconsumed_queue
    runs, unknown = sample(RUNS, name="app.tasks.multiply"), sample(RUNS, name="unknown")

    scheduler.apply_async(entry("app.tasks.multiply", queue), advance=False)
    scheduler.apply_async(entry("app.tasks.multiply", queue), advance=False)
    scheduler.apply_async(entry("not.a.registered.task", queue), advance=False)

    assert broker.llen(queue) == 3
    assert sample(RUNS, name="app.tasks.multiply") - runs == 2
    assert sample(RUNS, name="unknown") - unknown == 1


def test_an_entry_that_cannot_be_sent_counts_as_an_error(scheduler, unconsumed_queue, monkeypatch):
    queue, _ = unconsumed_queue
    runs, errors = sample(RUNS, name="app.tasks.multiply"), sample(ERRORS, name="app.tasks.multiply")

    def refuse(self, entry, **kwargs):
        raise SchedulingError("broker gone")

    monkeypatch.setattr(Scheduler, "apply_async", refuse)
    scheduler.apply_entry(entry("app.tasks.multiply", queue))  # logs the error, as beat does

    assert sample(ERRORS, name="app.tasks.multiply") - errors == 1
    assert sample(RUNS, name="app.tasks.multiply") == runs


@pytest.mark.integration
def test_real_beat_heartbeat_and_run_count(tmp_path, start_beat, unconsumed_queue):
    queue, broker = unconsumed_queue
    PeriodicTask.objects.create(
        name=f"every-second-{queue}",
        task="app.tasks.multiply",
        args="[2, 3]",
        queue=queue,
        interval=IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS),
    )
    heartbeat, metrics_port = tmp_path / "beat-heartbeat", free_port()
    beat = start_beat(CELERY_BEAT_HEARTBEAT_FILE=heartbeat, CELERY_METRICS_PORT=metrics_port)
    wait_for_port(metrics_port, timeout=60, process=beat.process)
    wait_until(heartbeat.exists, timeout=30, message=f"the heartbeat file:\n{beat.log()[-2000:]}")
    first = heartbeat.stat().st_mtime
    wait_until(lambda: heartbeat.stat().st_mtime > first, timeout=10, message="the heartbeat to advance")
    wait_until(lambda: broker.llen(queue) >= 3, timeout=30, message=f"3 sends:\n{beat.log()[-2000:]}")

    def runs_match_messages():
        before = scrape(metrics_port)
        messages = broker.llen(queue)
        after = scrape(metrics_port)
        counted = total(before, RUNS, name="app.tasks.multiply")
        return counted == messages == total(after, RUNS, name="app.tasks.multiply") and (counted, after)

    counted, found = wait_until(runs_match_messages, timeout=10, interval=0.05, message="a quiet moment")
    assert counted >= 3
    assert total(found, ERRORS) == 0
    assert total(found, LAST_TICK) == pytest.approx(time.time(), abs=10)
    assert "app.monitoring.beat_scheduler.DatabaseScheduler" in beat.log()


def scrape(port: int) -> list:
    status, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return samples(body)
