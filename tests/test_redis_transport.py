"""The Redis transport's outbox (app/redis_transport.py), against a real Redis: a task message a
worker took and never wrote down comes back; one written down, purged or still queued does not."""

import json
import time

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from app import redis_transport

QUEUE = Queue("outbox-test", Exchange("outbox-test"), "outbox-test")


@pytest.fixture
def client(redis_url):
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def connection(redis_url):
    with Connection(redis_url, transport=redis_transport.Transport) as connection:
        yield connection


def publish(connection, task: str | None = "app.tasks.add") -> None:
    headers = {"task": task, "id": "task-1"} if task else {}
    Producer(connection.default_channel).publish(
        {"args": [1, 2]}, exchange=QUEUE.exchange, routing_key="outbox-test", declare=[QUEUE], headers=headers
    )


def pop_like_a_dying_worker(client) -> bytes:
    """BRPOP's effect, and then nothing: the worker died before writing the message down."""
    return client.rpop("outbox-test")


def test_a_task_message_taken_and_never_written_down_is_pushed_back_after_two_sweeps(connection, client):
    publish(connection)
    assert client.hlen(redis_transport.OUTBOX) == 1
    payload = pop_like_a_dying_worker(client)
    now = time.time()

    # Too young to be looked for; then missing once (a live worker may be writing it down); then
    # missing for CONFIRM_SECONDS: pushed back, once, however many workers sweep.
    assert redis_transport.sweep(client, now) == 0
    assert redis_transport.sweep(client, now + redis_transport.CHECK_AFTER_SECONDS + 1) == 0
    assert client.llen("outbox-test") == 0
    later = now + redis_transport.CHECK_AFTER_SECONDS + redis_transport.CONFIRM_SECONDS + 2
    assert redis_transport.sweep(client, later) == 1
    assert redis_transport.sweep(client, later) == 0
    assert client.lrange("outbox-test", 0, -1) == [payload]


def take(connection):
    """One message taken as a worker takes it: popped and written down as unacknowledged."""
    received = []
    with Consumer(connection.default_channel, [QUEUE], callbacks=[lambda body, message: received.append(message)]):
        connection.drain_events(timeout=5)
    [message] = received
    return message


def test_a_message_a_worker_wrote_down_leaves_the_outbox(connection, client):
    publish(connection)
    message = take(connection)

    assert client.hlen(redis_transport.OUTBOX) == 0  # written down as unacknowledged instead
    assert client.hexists("unacked", message.delivery_tag)
    far = time.time() + 3600
    assert redis_transport.sweep(client, far) == redis_transport.sweep(client, far) == 0
    message.ack()
    assert client.llen("outbox-test") == 0
    assert client.hlen("unacked") == 0


def test_a_message_still_waiting_in_its_queue_stays_there_once(connection, client):
    publish(connection)
    far = time.time() + 3600
    assert redis_transport.sweep(client, far) == redis_transport.sweep(client, far + 100) == 0
    assert client.llen("outbox-test") == 1


def test_a_purged_queue_takes_its_messages_out_of_the_outbox(connection, client):
    publish(connection)
    QUEUE(connection.default_channel).purge()

    assert client.hlen(redis_transport.OUTBOX) == 0
    far = time.time() + 3600
    assert redis_transport.sweep(client, far) == redis_transport.sweep(client, far + 100) == 0
    assert client.llen("outbox-test") == 0


def test_only_task_messages_go_through_the_outbox(connection, client):
    publish(connection, task=None)  # e.g. a remote-control reply

    assert client.hlen(redis_transport.OUTBOX) == 0
    assert client.llen("outbox-test") == 1


def test_a_message_restored_from_the_unacknowledged_set_is_in_the_outbox_again(connection, client):
    publish(connection)
    message = take(connection)

    message.requeue()  # back to its list, as a restore or a reject with requeue does

    [record] = client.hvals(redis_transport.OUTBOX)
    queue, payload = record.split(b"\0", 1)
    assert queue == b"outbox-test"
    assert client.lrange("outbox-test", 0, -1) == [payload]
    assert json.loads(payload)["headers"]["redelivered"] is True


def test_a_restore_lock_its_sweeper_died_holding_stops_redelivery_for_seconds_not_minutes(connection, client):
    """A worker SIGKILLed mid-sweep (or a failover that replicated the lock, not its release)
    leaves kombu's restore lock behind; every worker's restore waits until it expires."""
    qos = connection.default_channel.qos
    held = client.lock(qos.unacked_mutex_key, timeout=qos.unacked_mutex_expire)
    assert held.acquire(blocking=False)  # taken as a sweep takes it, and never released

    assert 0 < client.ttl(qos.unacked_mutex_key) <= 30  # kombu's own: 300 s


def test_a_channel_whose_connection_is_gone_keeps_its_messages_and_fails_as_a_lost_connection(connection, client):
    """What Celery's consumer does after a lost broker (a Sentinel failover): collect() releases the
    transport's connection parameters while the channel's own close failed midway, the
    connection's close closes the channel again, and a task that ends afterwards acknowledges its
    message on that old channel. kombu rebuilt the pool from no connection both times
    (AttributeError: the worker exited)."""
    publish(connection)
    message = take(connection)
    channel = connection.default_channel
    connection.transport.client = None  # what kombu's Connection._do_close_transport leaves
    errors = connection.connection_errors + connection.channel_errors

    connection.maybe_close_channel(channel)  # raises nothing but a connection error, which it ignores
    with pytest.raises(errors):
        message.ack()

    assert client.hexists("unacked", message.delivery_tag)  # back after the visibility timeout


def test_a_channel_keeps_one_client_per_connection_pool(connection):
    """kombu built a new redis client for every publish; one per pool serves them, and the new
    pool a forked process gets (kombu drops its pools after a fork) gets a new client."""
    channel = connection.default_channel
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
        assert first.connection_pool is channel.pool
    channel._disconnect_pools()  # what kombu does in a forked child
    with channel.conn_or_acquire() as after_fork:
        assert after_fork is not first
        assert after_fork.connection_pool is channel.pool
        assert after_fork.ping()


@pytest.mark.parametrize(
    ("urls", "transport"),
    [
        ("redis://127.0.0.1:1/0;redis://127.0.0.1:2/0", redis_transport.Transport),
        ("sentinel://127.0.0.1:1/0;sentinel://127.0.0.1:2/0", redis_transport.SentinelTransport),
    ],
)
def test_a_failover_to_the_next_url_keeps_the_projects_transport(urls, transport):
    """kombu's Connection.switch() takes the transport from the next URL's scheme (no server is
    reached here: switching does not connect)."""
    connection = Connection(urls, transport=transport)
    assert connection.get_transport_cls() is transport

    connection.maybe_switch_next()

    assert (connection.hostname, connection.port) == ("127.0.0.1", 2)
    assert connection.get_transport_cls() is transport
