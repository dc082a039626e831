"""Bare Celery for the throughput baseline: the same trivial task, no Django, no result backend."""

import os

from celery import Celery

app = Celery("bare", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=1, accept_content=["json"])


@app.task(name="bench.add")
def add(x: float, y: float) -> float:
    return x + y
