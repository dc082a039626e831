"""API token checks without a database query per request, and still exact.

Each process keeps the active tokens (digest, scope, expiry, holder), tagged with a generation read from the
cache's Redis (CACHE_URL). Every change to a token (issued, disabled, deleted, from the admin, a
service or a management command) writes a new generation, and again once its transaction
commits; each check reads the generation (one Redis GET, a fraction of an indexed SELECT) and
reloads the tokens when it moved. So a disabled or deleted token is refused on the very next
request, by every process; an expired one from its expiry on (checked at each request).

A token's last use is written at most once a minute per process (LAST_USED_RESOLUTION), not at
each request: an admin sees it to the minute, and requests do not pay a write.

The GET goes through one Redis client kept per process: Django's cache API builds a client for
every call, which measured a twelfth of an enqueue request. Without a Redis cache (local memory,
the default without CACHE_URL), or while it fails, each check queries the database instead:
exact too, only slower.
"""

import dataclasses
import datetime as dt
import logging
import threading
import time
import uuid

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from app import redis_sentinel
from app.models import TOKEN_SCOPE_ORDER, ApiToken

logger = logging.getLogger(__name__)

GENERATION_KEY = "django-celery-k8s:api-tokens:generation"
# A safety net for a change Redis never heard of (it was down when the change committed).
MAX_SNAPSHOT_AGE_SECONDS = 60.0
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


@dataclasses.dataclass(frozen=True)
class Grant:
    """What an active token allows."""

    token_id: int
    name: str
    scope: str
    expires_at: dt.datetime | None
    owner_id: int | None

    def allows(self, scope: str) -> bool:
        return TOKEN_SCOPE_ORDER.index(self.scope) >= TOKEN_SCOPE_ORDER.index(scope)

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @property
    def holder(self) -> str:
        """Who holds the token: its owner, or the token itself when it has none."""
        return f"user:{self.owner_id}" if self.owner_id is not None else f"token:{self.token_id}"


GRANT_FIELDS = ("digest", "id", "name", "scope", "expires_at", "owner_id")

_lock = threading.Lock()
_generation: bytes | None = None
_loaded_at = 0.0
_grants: dict[str, Grant] = {}
_last_used_written: dict[int, float] = {}
_client: redis.Redis | None = None


def grant_for(digest: str) -> Grant | None:
    """The grant of the active token with this digest (expired or not), or None."""
    global _generation, _grants, _loaded_at
    client = _cache_redis()
    if client is None:
        return _grant_in_database(digest)
    try:
        generation = client.get(GENERATION_KEY)
        if generation is None:  # Redis lost the key (restarted, evicted): a new generation
            client.set(GENERATION_KEY, uuid.uuid4().hex, nx=True)
            generation = client.get(GENERATION_KEY)
    except redis.RedisError as exc:
        logger.warning("Cache unavailable (%r): checking the token in the database", exc)
        return _grant_in_database(digest)
    now = time.monotonic()
    if generation is None or generation != _generation or now - _loaded_at > MAX_SNAPSHOT_AGE_SECONDS:
        with _lock:
            # Read after the generation: a change committed meanwhile moves it again.
            grants = {row[0]: Grant(*row[1:]) for row in _active_tokens().values_list(*GRANT_FIELDS)}
            _grants, _generation, _loaded_at = grants, generation, now
    return _grants.get(digest)


def note_used(grant: Grant) -> None:
    """Write the token's last use, at most once per LAST_USED_RESOLUTION in this process (and
    only if no other process wrote it within that time)."""
    now = time.monotonic()
    if now - _last_used_written.get(grant.token_id, -1e9) < LAST_USED_RESOLUTION.total_seconds():
        return
    _last_used_written[grant.token_id] = now
    at = timezone.now()
    ApiToken.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=at - LAST_USED_RESOLUTION)).filter(
        pk=grant.token_id
    ).update(last_used_at=at)


def _active_tokens():
    return ApiToken.objects.filter(is_active=True)


def _grant_in_database(digest: str) -> Grant | None:
    row = _active_tokens().filter(digest=digest).values_list(*GRANT_FIELDS[1:]).first()
    return Grant(*row) if row else None


def _cache_redis() -> redis.Redis | None:
    """A client of the cache's (first) Redis server (its primary, for a sentinel:// cache), or None
    when the cache is not Redis. redis-py's connection pool starts afresh in a forked process by
    itself."""
    global _client
    if _client is None:
        cache = settings.CACHES["default"]
        if not cache["BACKEND"].endswith(".RedisCache"):
            return None
        location = cache["LOCATION"]
        url = location[0] if isinstance(location, list | tuple) else str(location).split(",")[0]
        options = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
        if redis_sentinel.is_sentinel_url(url):
            sentinel = cache["OPTIONS"]
            _client = redis_sentinel.primary_client(
                url, master_name=sentinel["master_name"], sentinel_kwargs=sentinel["sentinel_kwargs"], **options
            )
        else:
            # The cache's TLS options (a rediss:// CACHE_URL: project/tls.py); its URL has none left.
            tls = {key: value for key, value in cache.get("OPTIONS", {}).items() if key.startswith("ssl_")}
            _client = redis.Redis.from_url(url, **options, **tls)
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
