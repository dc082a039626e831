"""kombu's Redis transport, closing the one window in which it loses a task message.

A Redis worker takes a message with BRPOP, which removes it from the queue's list, and only
then writes it to the unacknowledged set (kombu's QoS.append), where a dead worker's messages
are found again after the visibility timeout. A worker killed between the two (the reply on its
way, or read and not yet written down) loses the message: the chaos run (tests/chaos/run.py)
found it in a broker's AOF, an LPUSH and an RPOP and nothing after.

Here every task message is also written to an outbox hash in the transaction that pushes it to
its list, and leaves the outbox in the transaction that writes it to the unacknowledged set (or
when its queue is purged or deleted). A message that sits in the outbox but in no list for two
sweeps ``CONFIRM_SECONDS`` apart was popped by a worker that died before writing it down: the
sweep pushes it back to the consuming end of its list. Workers sweep with kombu's own restore
sweep (REDIS_RESTORE_INTERVAL); the check and the push are one Lua script, so sweeping workers
never push a message twice. Restored messages (visibility timeout, warm shutdown, requeue)
enter the outbox again with their push.

Cost: the same round trips as kombu (the push and the write-down are each one transaction, two
more commands in it), and Redis memory for a second copy of each message while it waits in its
list. Only task messages (with a ``task`` header) go through the outbox, not control replies.

``SentinelTransport`` is the same on a primary found through Redis Sentinel (sentinel:// URLs).
"""

import time
from contextlib import contextmanager

from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from app import queued_records

OUTBOX = "outbox"
OUTBOX_INDEX = "outbox_index"
OUTBOX_MISSING = "outbox_missing"
# Seconds a message must have been in the outbox before a sweep looks for it in its list.
CHECK_AFTER_SECONDS = 10
# Seconds it must have been missing from its list, seen by two sweeps, before it is pushed back.
# A live worker writes a popped message down within milliseconds; a worker frozen longer than
# this between its BRPOP and its write-down would run the message beside the pushed-back copy.
CONFIRM_SECONDS = 20
SWEEP_LIMIT = 200

# KEYS: outbox, its index (score: when last seen queued), the missing set (score: first missed).
# ARGV: now, CHECK_AFTER_SECONDS, CONFIRM_SECONDS, SWEEP_LIMIT. Returns the messages pushed back.
SWEEP_LUA = """
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, tonumber(ARGV[4]))
local pushed = 0
for _, tag in ipairs(due) do
  local record = redis.call('HGET', KEYS[1], tag)
  if not record then
    redis.call('ZREM', KEYS[2], tag)
    redis.call('ZREM', KEYS[3], tag)
  else
    local sep = string.find(record, '\\0', 1, true)
    local queue, payload = string.sub(record, 1, sep - 1), string.sub(record, sep + 1)
    if redis.call('LPOS', queue, payload, 'RANK', -1) then
      redis.call('ZREM', KEYS[3], tag)
      redis.call('ZADD', KEYS[2], now, tag)
    else
      local missing_since = redis.call('ZSCORE', KEYS[3], tag)
      if not missing_since then
        redis.call('ZADD', KEYS[3], now, tag)
      elseif now - tonumber(missing_since) >= tonumber(ARGV[3]) then
        redis.call('RPUSH', queue, payload)
        redis.call('ZREM', KEYS[3], tag)
        redis.call('ZADD', KEYS[2], now, tag)
        pushed = pushed + 1
      end
    end
  end
end
return pushed
"""

# KEYS: outbox, its index, the missing set. ARGV: the list keys of a purged or deleted queue.
FORGET_QUEUE_LUA = """
local lists = {}
for i = 1, #ARGV do lists[ARGV[i]] = true end
local forgotten = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local record = entries[i + 1]
  local queue = string.sub(record, 1, string.find(record, '\\0', 1, true) - 1)
  if lists[queue] then
    redis.call('HDEL', KEYS[1], entries[i])
    redis.call('ZREM', KEYS[2], entries[i])
    redis.call('ZREM', KEYS[3], entries[i])
    forgotten = forgotten + 1
  end
end
return forgotten
"""


def sweep(client, now: float | None = None) -> int:
    """Push back the task messages a dead worker took before writing them down; the count."""
    return client.register_script(SWEEP_LUA)(
        keys=[OUTBOX, OUTBOX_INDEX, OUTBOX_MISSING],
        args=[time.time() if now is None else now, CHECK_AFTER_SECONDS, CONFIRM_SECONDS, SWEEP_LIMIT],
    )


def _record(list_key: str, payload: str) -> str:
    return f"{list_key}\0{payload}"


def _is_task(message: dict) -> bool:
    return bool((message.get("headers") or {}).get("task"))


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag):
        """Written down as unacknowledged and out of the outbox, in one transaction."""
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                self.unacked_key, delivery_tag, dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
            ).hdel(OUTBOX, delivery_tag).zrem(OUTBOX_INDEX, delivery_tag).zrem(OUTBOX_MISSING, delivery_tag).execute()
        virtual.QoS.append(self, message, delivery_tag)

    def restore_visible(self, *args, **kwargs):
        super().restore_visible(*args, **kwargs)
        with self.channel.conn_or_acquire() as client:
            pushed = sweep(client)
        if pushed:
            kombu_redis.logger.warning(
                "Pushed back %d task message(s) taken by a worker that died before writing them down", pushed
            )


class Channel(kombu_redis.Channel):
    QoS = QoS
    # The lock a worker takes for its restore sweep expires after this many seconds if the worker
    # dies holding it (SIGKILL mid-sweep; a Sentinel failover that replicated the lock and not its
    # release). kombu's 5 minutes stopped every redelivery for that long; a sweep takes
    # milliseconds, and two overlapping sweeps restore nothing twice (each restore is a WATCH
    # transaction on the unacknowledged set).
    unacked_mutex_expire = 30

    def _get_pool(self, asynchronous=False):
        """A lost connection, not an AttributeError, for a channel whose connection is gone.
        After a lost broker (a Sentinel failover showed it in about one run in two) Celery's
        consumer closes the old connection twice, and acknowledges the messages that old channel
        delivered once their tasks end: kombu then rebuilds the channel's pool from a connection
        that is None, and the AttributeError, which neither kombu nor Celery catches, ends the
        worker. As a connection error it is what those callers expect: the messages stay in the
        unacknowledged set and come back after the visibility timeout."""
        if self.connection is None or self.connection.client is None:
            raise kombu_redis.redis.exceptions.ConnectionError("the channel's broker connection is closed")
        return super()._get_pool(asynchronous)

    def _put(self, queue, message, **kwargs):
        if not _is_task(message):
            return super()._put(queue, message, **kwargs)
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        payload, tag = dumps(message), message["properties"]["delivery_tag"]
        commands = [  # Redis's own commands, as sent
            ("HSET", OUTBOX, tag, _record(key, payload)),
            ("ZADD", OUTBOX_INDEX, time.time(), tag),
            ("LPUSH", key, payload),
        ]
        if self._expires and queue in self._expires:
            commands += [("PEXPIRE", self._q_for_pri(queue, p), self._expires[queue]) for p in self.priority_steps]
        publish_batch = kwargs.pop("_publish_batch", None)
        if publish_batch is not None:
            for command in commands:
                publish_batch.add("execute_command", *command)
            return
        task_id = message["headers"].get("id")
        record = None if self.global_keyprefix else queued_records.command_for_publish(task_id, self.pool)
        with self.conn_or_acquire() as client:
            results = self._publish_transaction(client, commands if record is None else [*commands, record])
        for result in results[: len(commands)]:
            if isinstance(result, Exception):
                raise result
        if record is not None and not isinstance(results[-1], Exception):
            queued_records.recorded(task_id)

    def _publish_transaction(self, client, commands: list[tuple]) -> list:
        """The commands in one MULTI ... EXEC; each one's result or error."""
        with client.pipeline() as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return pipe.execute(raise_on_error=False)

    @contextmanager
    def conn_or_acquire(self, client=None):
        """kombu builds a new redis client for every call (0.1 ms: its 170 response callbacks,
        on every publish); one per connection pool serves them all, taking a pooled connection
        per command. A new pool (after a fork) gets a new client."""
        if client:
            yield client
            return
        pool = self.pool
        if self._client_pool is not pool:
            self._pooled_client, self._client_pool = self._create_client(), pool
        yield self._pooled_client

    _client_pool = None

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        """kombu's restore, and each restored task message back in the outbox in the same
        transaction (the same bytes: kombu serialises the payload it has just marked redelivered)."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        if not _is_task(payload):
            return
        raw, tag = dumps(payload), payload["properties"]["delivery_tag"]
        for queue in self._lookup(exchange, routing_key):
            key = self._q_for_pri(queue, self._get_message_priority(payload, reverse=False))
            pipe.hset(OUTBOX, tag, _record(key, raw)).zadd(OUTBOX_INDEX, {tag: time.time()})

    def _forget_queue(self, queue) -> None:
        lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            client.register_script(FORGET_QUEUE_LUA)(keys=[OUTBOX, OUTBOX_INDEX, OUTBOX_MISSING], args=lists)

    def _purge(self, queue):
        purged = super()._purge(queue)
        self._forget_queue(queue)
        return purged

    def _delete(self, queue, *args, **kwargs):
        super()._delete(queue, *args, **kwargs)
        self._forget_queue(queue)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same outbox, on the primary a Sentinel names (a sentinel:// broker URL, app/redis_sentinel.py).

    Redis replicates after it answers: a task message the primary took in the instant before it
    died would be missing on the promoted replica, though the API had answered 202 for it
    (tests/test_sentinel.py opens that window on purpose). So a task publish returns only once
    ``wait_for_replicas`` replicas have it: Redis's WAIT, sent on the transaction's own connection
    right behind its EXEC (one round trip still). A primary that dies meanwhile fails the publish, and its retry reaches the new
    primary. A replica that does not answer within ``wait_for_replicas_timeout`` seconds (it is
    down) does not stop publishing: the message is sent with a warning, and for the next
    ``REPLICAS_MISSING_BACKOFF`` seconds publishes do not wait, as Redis itself accepts writes
    without replicas unless its ``min-replicas-to-write`` says otherwise."""

    REPLICAS_MISSING_BACKOFF = 5.0

    from_transport_options = (
        *kombu_redis.SentinelChannel.from_transport_options,
        "wait_for_replicas",
        "wait_for_replicas_timeout",
    )
    wait_for_replicas = 1
    wait_for_replicas_timeout = 1.0
    _replicas_missing_until = 0.0
    # kombu's publish batches (many messages in one pipeline) would bypass the wait; Celery does
    # not use them, and kombu already refuses them with retry_on_timeout (project/settings.py).
    supports_batch_publish = False

    def _publish_transaction(self, client, commands: list[tuple]) -> list:
        if not self.wait_for_replicas or time.monotonic() < self._replicas_missing_until:
            return super()._publish_transaction(client, commands)
        pool = client.connection_pool
        connection = pool.get_connection()
        try:
            wait = ("WAIT", self.wait_for_replicas, int(self.wait_for_replicas_timeout * 1000))
            connection.send_packed_command(connection.pack_commands([("MULTI",), *commands, ("EXEC",), wait]))
            replies = [connection.read_response() for _ in range(len(commands) + 3)]
        except BaseException:
            connection.disconnect()  # replies may be left unread: never hand this connection out again
            raise
        finally:
            pool.release(connection)
        results, acknowledged = replies[-2], replies[-1]
        if acknowledged < self.wait_for_replicas:
            self._replicas_missing_until = time.monotonic() + self.REPLICAS_MISSING_BACKOFF
            kombu_redis.logger.warning(
                "A task message reached %d of %d replica(s) within %g s: it is lost if the primary fails "
                "before it replicates; publishes do not wait for replicas for the next %g s",
                acknowledged,
                self.wait_for_replicas,
                self.wait_for_replicas_timeout,
                self.REPLICAS_MISSING_BACKOFF,
            )
        return results


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


# kombu picks a transport from the URL's scheme again when it fails over to the next URL of a
# list (every Sentinel broker URL is one: sentinel://s1;sentinel://s2): Connection.switch() drops
# the transport it was given (CELERY_BROKER_TRANSPORT), and a worker carried on with kombu's own
# after its first failover, without the outbox, its sweep, the replica wait or the short restore
# lock. So the schemes themselves name this module's transports, from the moment kombu loads it.
TRANSPORT_ALIASES.update(
    redis=f"{__name__}:Transport", rediss=f"{__name__}:Transport", sentinel=f"{__name__}:SentinelTransport"
)
