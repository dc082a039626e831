"""Stock Celery configured like the project, for the benchmark's side-by-side run: the same broker,
a Redis result backend with extended results, task events on, JSON, prefetch 1, the same trivial
task with acks_late; no Django and no project code."""

import os

from celery import Celery

app = Celery("stock", broker=os.environ["CELERY_BROKER_URL"], backend=os.environ["CELERY_BROKER_URL"])
app.conf.update(
    worker_prefetch_multiplier=1,
    accept_content=["json"],
    task_serializer="json",
    result_serializer="json",
    result_extended=True,
    worker_send_task_events=True,
)


@app.task(name="bench.add", acks_late=True, reject_on_worker_lost=True)
def add(x: float, y: float) -> float:
    return x + y
