"""Redis through Sentinel: the ``sentinel://`` URLs of the broker, the results and the cache.

One URL names every Sentinel, separated by ``;``, with the primary's password and database on
the first (kombu's and Celery's form): ``sentinel://:password@s1:26379/0;sentinel://s2:26379/0``.
Each client asks a Sentinel for the primary named REDIS_SENTINEL_MASTER_NAME before it connects,
and again after a connection fails, so a failover needs no restart. The broker and the results
go through kombu's and Celery's own Sentinel support (app/redis_transport.py,
app/result_backend.py); this module serves the cache and every client the project makes itself.
"""

from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

SCHEME = "sentinel://"
DEFAULT_PORT = 26379


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SCHEME)


def sentinel_kwargs(*, password: str, socket_timeout: float) -> dict:
    """How to talk to the Sentinels themselves (not the primary): redis-py gives them only the
    socket options it is handed here."""
    options = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    return {**options, "password": password} if password else options


def transport_options(*, master_name: str, password: str, socket_timeout: float) -> dict:
    """kombu's and Celery's options for a sentinel:// broker or result backend."""
    return {
        "master_name": master_name,
        "sentinel_kwargs": sentinel_kwargs(password=password, socket_timeout=socket_timeout),
    }


def parse(url: str) -> tuple[list[tuple[str, int]], dict]:
    """The Sentinels' addresses, and the primary's connection options (db, username, password)."""
    chunks = [urlsplit(chunk) for chunk in url.split(";") if chunk]
    if not chunks or any(chunk.scheme != "sentinel" or not chunk.hostname for chunk in chunks):
        raise ValueError(f"not a sentinel://host:port[/db];sentinel://... URL: {url!r}")
    first = chunks[0]
    options = {"db": int(first.path.strip("/") or 0)}
    if first.username:
        options["username"] = unquote(first.username)
    if first.password:
        options["password"] = unquote(first.password)
    return [(chunk.hostname, chunk.port or DEFAULT_PORT) for chunk in chunks], options


def primary_pool(
    url: str, *, master_name: str, sentinel_kwargs: dict | None = None, **options
) -> SentinelConnectionPool:
    """A connection pool that always reaches the current primary."""
    sentinels, primary_options = parse(url)
    manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)
    return SentinelConnectionPool(master_name, manager, **primary_options, **options)


def location(pool: SentinelConnectionPool) -> tuple:
    """Which primary and database a Sentinel pool reaches (app/queued_records.py compares the
    broker's and the results'): its kwargs name no server, so the master name and the Sentinels."""
    sentinels = sorted(
        (client.connection_pool.connection_kwargs["host"], client.connection_pool.connection_kwargs["port"])
        for client in pool.sentinel_manager.sentinels
    )
    return ("sentinel", pool.service_name, tuple(sentinels), int(pool.connection_kwargs.get("db") or 0))


def primary_client(url: str, *, master_name: str, sentinel_kwargs: dict | None = None, **options) -> redis.Redis:
    return redis.Redis(
        connection_pool=primary_pool(url, master_name=master_name, sentinel_kwargs=sentinel_kwargs, **options)
    )


class CachePool:
    """Django's RedisCache ``pool_class`` for a sentinel:// LOCATION (see ``cache_settings``)."""

    @staticmethod
    def from_url(url: str, **options) -> SentinelConnectionPool:
        return primary_pool(url, **options)


def cache_settings(url: str, *, master_name: str, password: str, socket_timeout: float) -> dict:
    """Django's built-in RedisCache through Sentinel. LOCATION is a list of one URL: Django would
    split a string at each ``;`` into servers of their own, reading from all but the first."""
    parse(url)  # a malformed URL fails at start-up, not at the first cache call
    return {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": [url],
        "OPTIONS": {
            "pool_class": "app.redis_sentinel.CachePool",
            "master_name": master_name,
            "sentinel_kwargs": sentinel_kwargs(password=password, socket_timeout=socket_timeout),
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
        },
    }
