"""The Redis databases and TCP ports this pytest process may use: all of them in a plain run, a
share of its own when pytest-xdist runs several processes (PYTEST_XDIST_WORKER=gw0, gw1, ...),
so no two processes of one run ever hand out the same database or port.

Redis has 16 databases. Database 0, every other program's default, is left alone; 1-15 are split
evenly between the processes. The first two of a share are the process's broker and cache
(tests/embedded_services.py); a test takes one of the others with `empty_redis_db()`, emptied
before and after. Ports come from a range of 2,000 per process below Linux's ephemeral ports
(32768 and up), so they never collide with a port the kernel picks for some other socket.
"""

import os
import socket
from contextlib import contextmanager

REDIS_DATABASES = range(1, 16)
PORTS_PER_PROCESS = 2_000
FIRST_PORT = 20_000


def process_index() -> int:
    """0 for a plain run and for xdist's gw0, 1 for gw1, ..."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def process_count() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def redis_share() -> list[int]:
    """This process's databases; the first two are its broker and cache."""
    size = len(REDIS_DATABASES) // process_count()
    if size < 4:
        raise RuntimeError(
            f"{process_count()} pytest-xdist processes leave {size} Redis databases each; "
            "a process needs 4 (broker, cache and two for one test): run with -n 3 or fewer"
        )
    start = process_index() * size
    return list(REDIS_DATABASES[start : start + size])


BROKER_DB, CACHE_DB, *TEST_DATABASES = redis_share()
_free_databases = list(TEST_DATABASES)


def redis_url(db: int) -> str:
    return f"{os.environ['REDIS_URL'].rstrip('/')}/{db}"


@contextmanager
def empty_redis_db():
    """A database of the suite's Redis nobody else in this run uses, emptied before and after:
    its URL."""
    import redis

    if not _free_databases:
        raise RuntimeError(f"every test database of this process ({TEST_DATABASES}) is in use")
    db = _free_databases.pop(0)
    url = redis_url(db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        _free_databases.insert(0, db)


_next_port = FIRST_PORT + process_index() * PORTS_PER_PROCESS


def free_port() -> int:
    """A loopback port nothing listens on, from this process's range, never handed out twice in a
    row: a server started by one test cannot be mistaken for the next test's."""
    global _next_port
    first = FIRST_PORT + process_index() * PORTS_PER_PROCESS
    for _ in range(PORTS_PER_PROCESS):
        port = _next_port
        _next_port = first + (port + 1 - first) % PORTS_PER_PROCESS
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + PORTS_PER_PROCESS - 1}")
