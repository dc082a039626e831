"""The project's Celery app, with every task run written down for the chaos run
(tests/chaos/run.py):

    celery -A tests.apps.chaos_tasks worker ...

Each run of any task appends [task id, retries, time, pid] to the list ``chaos:runs`` in the Redis at
CHAOS_LEDGER_URL (not the broker, which the chaos run restarts), so lost, duplicated and
redelivered tasks can be told apart (a retry is a new attempt, not a second run of one). Two tasks of its own sleep a while, so that the kills find
tasks running: ``chaos.work`` (at least once) and ``chaos.work_once`` (at most once).
"""

import json
import os
import time

import redis
from celery import signals

from app.task_class import IDEMPOTENT
from project.celery import app

RUNS = "chaos:runs"
_ledger: redis.Redis | None = None


def ledger() -> redis.Redis:
    global _ledger
    if _ledger is None:  # in the pool process itself: a client is never shared across a fork
        _ledger = redis.Redis.from_url(os.environ["CHAOS_LEDGER_URL"])
    return _ledger


@signals.task_prerun.connect
def write_down_the_run(task_id=None, task=None, **_) -> None:
    retries = task.request.retries if task is not None else 0
    ledger().rpush(RUNS, json.dumps([task_id, retries, time.time(), os.getpid()]))


@app.task(name="chaos.work", track_started=True, **IDEMPOTENT)
def work(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="chaos.work_once", track_started=True)
def work_once(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
