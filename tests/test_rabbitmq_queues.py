"""RabbitMQ's task queues (app/rabbitmq_queues.py) on a real RabbitMQ with real prefork workers:
a message that kills every worker taking it stops in the dead-letter queue after the delivery
limit and can be sent back; a message a worker rejects is kept there too; countdowns wait in
RabbitMQ, not in the worker; an expired task is stored REVOKED, not dead-lettered; a classic
queue of the same name is refused with a clear error. Each test uses queues of its own, deleted
afterwards."""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
from kombu import Connection, Queue

from app import rabbitmq_queues
from tests.conftest import celery_app_for, wait_until
from tests.processes import REPO_ROOT, new_hostname, start_worker, subprocess_env, worker_command

pytestmark = pytest.mark.integration


@pytest.fixture
def rabbitmq_url() -> str:
    url = os.environ.get("RABBITMQ_URL")
    if not url:
        pytest.skip("RABBITMQ_URL not set: the RabbitMQ queue tests need a running RabbitMQ")
    return url


@pytest.fixture
def queue(rabbitmq_url) -> str:
    name = f"test_{uuid.uuid4().hex[:10]}"
    yield name
    with Connection(rabbitmq_url) as connection:
        for declared in (name, rabbitmq_queues.dead_letter_queue_name(name)):
            with connection.channel() as channel:
                channel.queue_delete(declared)


def app_on(rabbitmq_url: str, redis_url: str, queue: str, *, delivery_limit: int):
    """The project's app as a worker on `queue` sees it: the queue is one of its task queues."""
    return celery_app_for(
        rabbitmq_url,
        result_backend=f"app.result_backend:RedisStateBackend+{redis_url}",
        **rabbitmq_queues.celery_settings([queue], queue_type="quorum", delivery_limit=delivery_limit),
    )


def worker_on(app, rabbitmq_url, redis_url, queue, log_dir, *, delivery_limit: int, wait: bool = True):
    return start_worker(
        app,
        broker_url=rabbitmq_url,
        log_dir=log_dir,
        concurrency=1,
        app_module="tests.apps.faulty_tasks",
        queues=queue,
        RESULT_BACKEND_URL=redis_url,
        RUNS_URL=redis_url,
        purge=False,  # the queue is the test's own: a redelivered message must stay
        wait=wait,
        TASK_HISTORY_RECORDER="false",
        # Its only task queue, declared as the project declares every pool's queue (the suite's
        # default and long queues keep their own delivery limit).
        CELERY_DEFAULT_QUEUE=queue,
        CELERY_LONG_QUEUE=queue,
        CELERY_CANARY_QUEUES=queue,
        RABBITMQ_DELIVERY_LIMIT=str(delivery_limit),
    )


def messages_in(rabbitmq_url: str, queue: str) -> int:
    with Connection(rabbitmq_url) as connection, connection.channel() as channel:
        return channel.queue_declare(queue=queue, passive=True).message_count


def peek(rabbitmq_url: str, queue: str):
    """The first message of `queue`, left in it."""
    with Connection(rabbitmq_url) as connection, connection.channel() as channel:
        message = Queue(queue, no_declare=True).bind(channel).get(no_ack=False, accept=["json"])
        try:
            return message and {"headers": message.headers, "properties": message.properties, "body": message.body}
        finally:
            if message:
                message.requeue()


def stored(redis_url: str, task_id: str) -> dict | None:
    raw = redis.Redis.from_url(redis_url).get(f"celery-task-meta-{task_id}")
    return json.loads(raw) if raw else None


def test_a_message_that_kills_every_worker_stops_in_the_dead_letter_queue_and_can_be_sent_back(
    rabbitmq_url, redis_url, queue, service_log_dir
):
    app = app_on(rabbitmq_url, redis_url, queue, delivery_limit=1)
    dead_letters = rabbitmq_queues.dead_letter_queue_name(queue)
    key = f"runs-{uuid.uuid4().hex}"
    result = app.send_task("faulty.kills_its_worker", args=[key], queue=queue)
    for run in (1, 2):  # the first delivery, and the one redelivery the limit allows
        # Not waited for: it takes the message as it starts and dies.
        worker = worker_on(app, rabbitmq_url, redis_url, queue, service_log_dir, delivery_limit=1, wait=False)
        try:
            worker.process.wait(timeout=60)  # killed by the task
        finally:
            worker.stop()
        assert int(redis.Redis.from_url(redis_url).get(key)) == run

    wait_until(lambda: messages_in(rabbitmq_url, dead_letters) == 1, timeout=10, message="the dead letter")
    assert messages_in(rabbitmq_url, queue) == 0
    dead = peek(rabbitmq_url, dead_letters)
    assert dead["headers"]["x-first-death-reason"] == "delivery_limit"
    assert dead["properties"]["correlation_id"] == result.id

    with app.connection_for_write() as connection:
        assert rabbitmq_queues.requeue_dead_letters(connection, queue) == 1

    assert (messages_in(rabbitmq_url, dead_letters), messages_in(rabbitmq_url, queue)) == (0, 1)
    back = peek(rabbitmq_url, queue)
    assert back["properties"]["correlation_id"] == result.id  # the same task, whole
    assert back["headers"]["task"] == "faulty.kills_its_worker"
    assert back["body"] == dead["body"]
    assert not any(name.startswith(("x-death", "x-first-death")) for name in back["headers"])


def test_a_message_a_worker_rejects_is_kept_in_the_dead_letter_queue(rabbitmq_url, redis_url, queue, service_log_dir):
    app = app_on(rabbitmq_url, redis_url, queue, delivery_limit=5)
    worker = worker_on(app, rabbitmq_url, redis_url, queue, service_log_dir, delivery_limit=5)
    try:
        app.send_task("no.such.task", args=[1], queue=queue)  # an unknown task: Celery rejects it
        dead_letters = rabbitmq_queues.dead_letter_queue_name(queue)
        wait_until(lambda: messages_in(rabbitmq_url, dead_letters) == 1, timeout=30, message="the rejected message")
    finally:
        worker.stop()
    assert peek(rabbitmq_url, dead_letters)["headers"]["x-first-death-reason"] == "rejected"


def test_a_countdown_waits_in_rabbitmq_and_an_expired_task_is_revoked_not_dead_lettered(
    rabbitmq_url, redis_url, queue, service_log_dir
):
    app = app_on(rabbitmq_url, redis_url, queue, delivery_limit=5)
    worker = worker_on(app, rabbitmq_url, redis_url, queue, service_log_dir, delivery_limit=5)
    try:
        sent_at = time.time()
        delayed = app.send_task("app.tasks.add", args=[2, 3], queue=queue, countdown=4)
        expired = app.send_task("app.tasks.add", args=[1, 1], queue=queue, countdown=2, expires=1)
        time.sleep(1)
        # Neither message is in the worker (a quorum queue's prefetch is fixed: one held there
        # would occupy it) nor in the task queue yet.
        assert app.control.inspect([worker.hostname], timeout=2).scheduled() == {worker.hostname: []}
        assert messages_in(rabbitmq_url, queue) == 0

        meta = wait_until(lambda: stored(redis_url, delayed.id), timeout=30, message="the delayed task's result")
        gone = wait_until(lambda: stored(redis_url, expired.id), timeout=30, message="the expired task's state")
    finally:
        worker.stop()
    assert (meta["status"], meta["result"], meta["queue"]) == ("SUCCESS", 5, queue)  # no delay prefix
    assert time.time() - sent_at >= 4
    assert gone["status"] == "REVOKED"
    assert messages_in(rabbitmq_url, rabbitmq_queues.dead_letter_queue_name(queue)) == 0


def test_a_delayed_task_that_retries_at_once_runs_again(rabbitmq_url, redis_url, queue, service_log_dir):
    # A retry is sent where the message came from: for one that waited in the delayed delivery,
    # not to the delay exchange it arrived by (a retry with no delay was unroutable there, lost).
    app = app_on(rabbitmq_url, redis_url, queue, delivery_limit=5)
    worker = worker_on(app, rabbitmq_url, redis_url, queue, service_log_dir, delivery_limit=5)
    key = f"runs-{uuid.uuid4().hex}"
    try:
        sent = app.send_task("faulty.retry_at_once", args=[key], queue=queue, countdown=2)
        meta = wait_until(
            lambda: (stored(redis_url, sent.id) or {}).get("status") == "SUCCESS" and stored(redis_url, sent.id),
            timeout=30,
            message="the retried task's success",
        )
    finally:
        worker.stop()
    assert (meta["result"], meta["queue"]) == (2, queue)


def test_a_classic_queue_of_the_same_name_is_refused_with_what_to_do(rabbitmq_url, queue):
    with Connection(rabbitmq_url) as connection, connection.channel() as channel:
        Queue(queue, durable=True).bind(channel).declare()  # as Celery's classic queues were

    run = subprocess.run(
        worker_command(hostname=new_hostname(), queues=queue, pool="solo", purge=False),
        cwd=REPO_ROOT,
        env=subprocess_env(
            CELERY_BROKER_URL=rabbitmq_url,
            CELERY_DEFAULT_QUEUE=queue,
            CELERY_LONG_QUEUE=queue,
            CELERY_CANARY_QUEUES=queue,
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )

    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert f"inequivalent arg 'x-dead-letter-exchange' for queue '{queue}'" in output
    assert "a classic queue cannot become a quorum queue" in output
    assert "RABBITMQ_QUEUE_TYPE=classic" in output


def test_the_requeue_command_sends_dead_letters_back(rabbitmq_url, queue):
    dead_letters = rabbitmq_queues.dead_letter_queue_name(queue)
    with Connection(rabbitmq_url) as connection, connection.channel() as channel:
        rabbitmq_queues.task_queue(queue, delivery_limit=5).bind(channel).declare()
        producer = connection.Producer(channel)
        for i in range(3):
            producer.publish({"i": i}, exchange="", routing_key=dead_letters, headers={"x-death": [{"count": 1}]})

    def requeue(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", "requeue_dead_letters", *args],
            cwd=REPO_ROOT,
            env=subprocess_env(CELERY_BROKER_URL=rabbitmq_url, CELERY_CANARY_QUEUES=queue),
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = requeue(queue, "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"Sent 2 message(s) from {dead_letters} back to {queue}."
    assert (messages_in(rabbitmq_url, dead_letters), messages_in(rabbitmq_url, queue)) == (1, 2)
    assert requeue(queue).stdout.strip() == f"Sent 1 message(s) from {dead_letters} back to {queue}."
    assert [peek_and_take(rabbitmq_url, queue) for _ in range(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]  # in order

    wrong = requeue(dead_letters)
    assert wrong.returncode != 0
    assert f"Name the task queue, not its dead-letter queue: '{queue}'" in wrong.stderr


def peek_and_take(rabbitmq_url: str, queue: str):
    with Connection(rabbitmq_url) as connection, connection.channel() as channel:
        message = Queue(queue, no_declare=True).bind(channel).get(no_ack=True, accept=["json"])
        return message and message.decode()
