"""Ids handed out to a client are recorded as queued in the transaction that publishes them when
the broker and the result backend share a Redis database, and after the publish otherwise
(app/queued_records.py), against a real Redis."""

import json
import threading

import pytest
import redis
from celery.utils import uuid

from app import queued_records, result_backend, workflows
from tests.conftest import celery_app_for
from tests.resources import empty_redis_db


@pytest.fixture
def broker_url():
    with empty_redis_db() as url:
        yield url


@pytest.fixture
def other_results_url():
    with empty_redis_db() as url:
        yield url


def app_with_results_at(broker_url: str, results_url: str):
    return celery_app_for(broker_url, result_backend=f"app.result_backend:RedisStateBackend+{results_url}")


def send_recorded(app, task_id: str) -> None:
    meta = workflows.queued_meta(task_id, "app.tasks.add", [2, 3], {})
    with queued_records.recorded_with_publish([meta], app.backend):
        app.send_task("app.tasks.add", args=[2, 3], task_id=task_id, queue="default")


def assert_recorded_as_queued(results_url: str, *task_ids: str) -> None:
    client = redis.Redis.from_url(results_url)
    for task_id in task_ids:
        stored = json.loads(client.get(f"celery-task-meta-{task_id}"))
        assert (stored["status"], stored["task_id"], stored["args"]) == ("PENDING", task_id, [2, 3])
    history = [json.loads(fields[b"meta"]) for _, fields in client.xrange(result_backend.HISTORY_STREAM)]
    assert [(entry["task_id"], entry["status"]) for entry in history] == [(task_id, "PENDING") for task_id in task_ids]


def commands_seen_by_the_server(results_url: str, action) -> list[str]:
    """The commands the Redis server ran on the database of `results_url` while `action` ran (MONITOR)."""
    monitor_client = redis.Redis.from_url(results_url)
    database = monitor_client.connection_pool.connection_kwargs["db"]
    seen, ready, done = [], threading.Event(), threading.Event()

    def watch():
        with monitor_client.monitor() as monitor:
            ready.set()
            for line in monitor.listen():
                command = line["command"].split()[0].upper()
                if command == "ECHO" and "end-of-test" in line["command"]:
                    break
                if line["db"] == database and command != "SELECT":  # SELECT: a connection set up
                    seen.append(command)
        done.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(5)
    action()
    redis.Redis.from_url(results_url).echo("end-of-test")
    assert done.wait(5)
    return seen


def test_the_record_is_written_in_the_publish_transaction_when_the_broker_is_the_result_store(broker_url):
    app, first, second = app_with_results_at(broker_url, broker_url), uuid(), uuid()
    send_recorded(app, first)  # declares the queue; a new server learns the script (the next test)

    seen = commands_seen_by_the_server(broker_url, lambda: send_recorded(app, second))

    # One MULTI ... EXEC holds the outbox entry, the push and the record (the script's SET and
    # XADD); nothing runs after it.
    assert seen == ["MULTI", "HSET", "ZADD", "LPUSH", "EVALSHA", "SET", "XADD", "EXEC"]
    assert_recorded_as_queued(broker_url, first, second)
    assert redis.Redis.from_url(broker_url).llen("default") == 2


def test_with_results_in_another_database_the_record_follows_the_publish(broker_url, other_results_url):
    app, task_id = app_with_results_at(broker_url, other_results_url), uuid()

    send_recorded(app, task_id)

    assert_recorded_as_queued(other_results_url, task_id)
    broker = redis.Redis.from_url(broker_url)
    assert broker.llen("default") == 1
    assert broker.keys("celery-task-meta-*") == []


def test_a_record_the_transaction_could_not_store_is_written_after_it(broker_url):
    """A Redis that lost its scripts (restarted, SCRIPT FLUSH) answers NOSCRIPT in the transaction:
    the message is published all the same, and the record written on its own loads the script."""
    app, task_id = app_with_results_at(broker_url, broker_url), uuid()
    client = redis.Redis.from_url(broker_url)
    client.script_flush()

    send_recorded(app, task_id)

    assert client.llen("default") == 1
    assert_recorded_as_queued(broker_url, task_id)


def test_nothing_is_recorded_when_the_publish_fails(broker_url):
    app, task_id = app_with_results_at(broker_url, broker_url), uuid()
    meta = workflows.queued_meta(task_id, "app.tasks.add", [2, 3], {})

    with pytest.raises(ConnectionError), queued_records.recorded_with_publish([meta], app.backend):
        raise ConnectionError("the broker refused the publish")

    assert redis.Redis.from_url(broker_url).keys("*") == []
