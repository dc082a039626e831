"""API token checks without a database query per request, and still exact.

Each process keeps the digests of the active tokens, tagged with a generation read from the
cache's Redis (CACHE_URL). Every change to a token (issued, disabled, deleted, from the admin, a
service or a management command) writes a new generation, and again once its transaction
commits; each check reads the generation (one Redis GET, a fraction of an indexed SELECT) and
reloads the digests when it moved. So a disabled or deleted token is refused on the very next
request, by every process.

The GET goes through one Redis client kept per process: Django's cache API builds a client for
every call, which measured a twelfth of an enqueue request. Without a Redis cache (local memory,
the default without CACHE_URL), or while it fails, each check queries the database instead:
exact too, only slower.
"""

import logging
import threading
import time
import uuid

import redis
from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from app.models import ApiToken

logger = logging.getLogger(__name__)

GENERATION_KEY = "django-celery-k8s:api-tokens:generation"
# A safety net for a change Redis never heard of (it was down when the change committed).
MAX_SNAPSHOT_AGE_SECONDS = 60.0

_lock = threading.Lock()
_generation: bytes | None = None
_loaded_at = 0.0
_digests: frozenset[str] = frozenset()
_client: redis.Redis | None = None


def is_active(digest: str) -> bool:
    global _generation, _digests, _loaded_at
    client = _cache_redis()
    if client is None:
        return _active_in_database(digest)
    try:
        generation = client.get(GENERATION_KEY)
        if generation is None:  # Redis lost the key (restarted, evicted): a new generation
            client.set(GENERATION_KEY, uuid.uuid4().hex, nx=True)
            generation = client.get(GENERATION_KEY)
    except redis.RedisError as exc:
        logger.warning("Cache unavailable (%r): checking the token in the database", exc)
        return _active_in_database(digest)
    now = time.monotonic()
    if generation is None or generation != _generation or now - _loaded_at > MAX_SNAPSHOT_AGE_SECONDS:
        with _lock:
            # Read after the generation: a change committed meanwhile moves it again.
            digests = frozenset(ApiToken.objects.filter(is_active=True).values_list("digest", flat=True))
            _digests, _generation, _loaded_at = digests, generation, now
    return digest in _digests


def _active_in_database(digest: str) -> bool:
    return ApiToken.objects.filter(digest=digest, is_active=True).exists()


def _cache_redis() -> redis.Redis | None:
    """A client of the cache's (first) Redis server, or None when the cache is not Redis. redis-py's
    connection pool starts afresh in a forked process by itself."""
    global _client
    if _client is None:
        cache = settings.CACHES["default"]
        if not cache["BACKEND"].endswith(".RedisCache"):
            return None
        location = cache["LOCATION"]
        url = location[0] if isinstance(location, list | tuple) else str(location).split(",")[0]
        _client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    return _client


def _new_generation() -> None:
    client = _cache_redis()
    if client is None:
        return
    try:
        client.set(GENERATION_KEY, uuid.uuid4().hex)
    except redis.RedisError as exc:
        # Processes then see the change when their copy expires (MAX_SNAPSHOT_AGE_SECONDS), or at
        # once if Redis lost the key (e.g. make run's first start: its Redis is not up yet).
        logger.warning(
            "Cache unavailable (%r): other processes see this token change within %.0f s",
            exc,
            MAX_SNAPSHOT_AGE_SECONDS,
        )


@receiver(post_save, sender=ApiToken)
@receiver(post_delete, sender=ApiToken)
def token_changed(**_) -> None:
    # Now, so that this process sees its own change inside the transaction, and again once the
    # transaction commits: a process that reloaded in between read the rows before the change.
    _new_generation()
    transaction.on_commit(_new_generation)
