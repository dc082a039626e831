"""The project's Celery app with two tasks that fail the way production does, for the delivery
tests (tests/test_delivery.py):

    celery -A tests.apps.faulty_tasks worker ...

- ``retry_while_broker_unreachable``: its first run retries through a broker that refuses
  connections (as when the broker is down or restarting), so the retry cannot be published;
  the next run succeeds. Counted in Redis at RUNS_URL, under the key it is given.
  ``retry_at_once``: its first run retries with no delay (countdown 0).
- ``kills_its_process``: every run SIGKILLs its own pool process, as an out-of-memory kill would;
  ``kills_its_worker`` SIGKILLs the worker's main process, as a poison message that crashes it would.
- ``count_at_most_once``: counts its runs (at most once); ``sleep_at_most_once`` counts, then sleeps.
- ``dies_after_storing_success``: at least once; on its first run, its pool process is SIGKILLed
  right after its SUCCESS is stored, before it counts in its chord. ``chord_callback`` counts.
- ``slow_at_least_once`` (default queue, the default short time limits) and ``slow_on_long``
  (routed to the long queue, 30 s limits): sleep, after counting and timing each run.
"""

import os
import signal
import time

import redis
from celery import signals
from django.conf import settings
from kombu import Connection

from app.task_class import IDEMPOTENT
from project.celery import app

# Routed as the project routes its long tasks; read by the worker's app when it is configured.
settings.CELERY_TASK_ROUTES["faulty.slow_on_long"] = {"queue": "long"}

# Nothing listens on port 1: every connection is refused at once.
UNREACHABLE_BROKER_URL = "redis://127.0.0.1:1/0"


def _runs(key: str) -> int:
    client = redis.Redis.from_url(os.environ["RUNS_URL"])
    client.rpush(f"{key}:started", time.time())
    return client.incr(key)


def _retry_while_broker_unreachable(task, key: str) -> int:
    runs = _runs(key)
    if runs == 1:
        raise task.retry(countdown=0, connection=Connection(UNREACHABLE_BROKER_URL))
    return runs


@app.task(bind=True, name="faulty.retry_at_least_once", **IDEMPOTENT)
def retry_at_least_once(self, key: str) -> int:
    return _retry_while_broker_unreachable(self, key)


@app.task(bind=True, name="faulty.retry_at_most_once")
def retry_at_most_once(self, key: str) -> int:
    return _retry_while_broker_unreachable(self, key)


@app.task(bind=True, name="faulty.retry_at_once", **IDEMPOTENT)
def retry_at_once(self, key: str) -> int:
    """Retries once with no delay, as a retry with full jitter now and then does."""
    runs = _runs(key)
    if runs == 1:
        raise self.retry(countdown=0)
    return runs


@app.task(name="faulty.kills_its_process", **IDEMPOTENT)
def kills_its_process(key: str) -> None:
    _runs(key)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="faulty.kills_its_worker", **IDEMPOTENT)
def kills_its_worker(key: str) -> None:
    _runs(key)
    os.kill(os.getppid(), signal.SIGKILL)  # the worker's main process: its broker connection closes
    os._exit(1)


@app.task(name="faulty.slow_at_least_once", **IDEMPOTENT)
def slow_at_least_once(key: str, seconds: float) -> int:
    runs = _runs(key)
    time.sleep(seconds)
    return runs


@app.task(name="faulty.slow_on_long", soft_time_limit=25, time_limit=30, **IDEMPOTENT)
def slow_on_long(key: str, seconds: float) -> int:
    runs = _runs(key)
    time.sleep(seconds)
    return runs


@app.task(name="faulty.count_at_most_once")
def count_at_most_once(key: str) -> int:
    return _runs(key)


@app.task(name="faulty.sleep_at_most_once")
def sleep_at_most_once(key: str, seconds: float) -> int:
    runs = _runs(key)
    time.sleep(seconds)
    return runs


@app.task(name="faulty.dies_after_storing_success", **IDEMPOTENT)
def dies_after_storing_success(key: str) -> int:
    return _runs(key)


@app.task(name="faulty.chord_callback", **IDEMPOTENT)
def chord_callback(results: list, key: str) -> list:
    _runs(key)
    return results


@signals.worker_process_init.connect
def die_after_the_first_stored_success(**_):
    """In each pool process: SIGKILL it right after a first run of dies_after_storing_success
    stored SUCCESS, before Celery counts the task in its chord (Backend.mark_as_done)."""
    backend = app.backend
    store_result = backend.store_result

    def store_then_die(task_id, result, state, *args, request=None, **kwargs):
        stored = store_result(task_id, result, state, *args, request=request, **kwargs)
        first_run = result == 1 and getattr(request, "task", None) == dies_after_storing_success.name
        if state == "SUCCESS" and first_run:
            os.kill(os.getpid(), signal.SIGKILL)
        return stored

    backend.store_result = store_then_die
