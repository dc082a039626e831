"""Ids handed out to a client, recorded as queued in the transaction that publishes them.

The web answers a client with the ids it enqueued and records each one as queued (PENDING) in
the result backend, so that GET /api/task-status/<id>/ tells "queued" from "never heard of"
(app/result_backend.py, record_queued). On its own that record is one more Redis round trip
per request after the publish. When the broker and the Redis result backend are the same Redis
database (the default: RESULT_BACKEND_URL is the broker's URL), the project's transport
(app/redis_transport.py) writes the record in the MULTI that pushes the message: one round
trip for both, and "queued" is stored exactly when the message is.

Whatever a publish did not take (another database or server, RabbitMQ, a message sent inside
another, as a chain's later steps, or a record that failed in the transaction) is recorded on
its own once the block ends. Nothing is recorded when the block raises: the publish failed.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from redis.sentinel import SentinelConnectionPool

from app import redis_sentinel

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    backend: object
    metas: dict[str, dict]  # by task id: the records not written yet


_pending: ContextVar[_Pending | None] = ContextVar("queued_records", default=None)


@contextmanager
def recorded_with_publish(metas: list[dict], backend) -> Iterator[None]:
    """Publish inside the block: each meta (app/result_backend.queued_meta) is recorded in
    `backend` by the publish of its own task id where the transport can, and on its own after
    the block if not."""
    pending = _Pending(backend=backend, metas={meta["task_id"]: meta for meta in metas})
    token = _pending.set(pending)
    try:
        yield
    finally:
        _pending.reset(token)
    record(list(pending.metas.values()), backend)


def redis_location(pool) -> tuple:
    """Which Redis server and database a redis-py connection pool reaches: (host, port, unix
    socket path, database); through Sentinel, whose pool names no server, the master name and
    the Sentinels (app/redis_sentinel.py)."""
    if isinstance(pool, SentinelConnectionPool):
        return redis_sentinel.location(pool)
    kwargs = pool.connection_kwargs
    return (kwargs.get("host"), kwargs.get("port"), kwargs.get("path"), int(kwargs.get("db") or 0))


def command_for_publish(task_id: str, pool) -> tuple | None:
    """The command that records `task_id` as queued, for the transaction publishing it through
    this redis-py connection pool, or None when nothing waits to be recorded (every publish but
    the web's: checked first, the location only then) or the result backend stores elsewhere."""
    pending = _pending.get()
    if pending is None or task_id not in pending.metas:
        return None
    backend = pending.backend
    if getattr(backend, "location", None) != redis_location(pool):
        return None
    return backend.record_queued_command([pending.metas[task_id]])


def recorded(task_id: str) -> None:
    """The publish's transaction stored the record of `task_id`."""
    pending = _pending.get()
    if pending is not None:
        pending.metas.pop(task_id, None)


def record(metas: list[dict], backend) -> None:
    """Record these ids as queued in `backend` on their own (after their publish)."""
    if not metas:
        return
    try:
        backend.record_queued(metas)
    except Exception as exc:
        # The tasks are on their way: the client still gets their ids, and each one's state is
        # known from its first stored state on. Only "queued" is not, until then.
        logger.warning("Could not record %d queued task id(s) in the result backend: %r", len(metas), exc)
