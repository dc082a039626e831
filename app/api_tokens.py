"""API token checks without a database query per request, and still exact.

Each process keeps the digests of the active tokens, tagged with a generation read from the
shared cache (CACHE_URL). Every change to a token (issued, disabled, deleted, from the admin,
a service or a management command) writes a new generation once its transaction commits; each
check reads the generation (one cache GET, a fraction of an indexed SELECT) and reloads the
digests when it moved. So a disabled or deleted token is refused on the very next request.

With a cache that processes do not share (local memory, the default without CACHE_URL) or a
cache that fails, each check queries the database instead: exact too, only slower.
"""

import logging
import threading
import time
import uuid

from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from app.models import ApiToken

logger = logging.getLogger(__name__)

GENERATION_KEY = "api-tokens:generation"
# A safety net for a change the cache never heard of (it was down when the change committed).
MAX_SNAPSHOT_AGE_SECONDS = 60.0

_lock = threading.Lock()
_generation: str | None = None
_loaded_at = 0.0
_digests: frozenset[str] = frozenset()


def is_active(digest: str) -> bool:
    global _generation, _digests, _loaded_at
    if not _cache_is_shared():
        return ApiToken.objects.filter(digest=digest, is_active=True).exists()
    try:
        generation = cache.get(GENERATION_KEY)
        if generation is None:  # a cache that lost the key (restarted, evicted): a new generation
            cache.add(GENERATION_KEY, uuid.uuid4().hex, timeout=None)
            generation = cache.get(GENERATION_KEY)
    except Exception as exc:
        logger.warning("Token cache unavailable (%r): checking the database", exc)
        return ApiToken.objects.filter(digest=digest, is_active=True).exists()
    now = time.monotonic()
    if generation is None or generation != _generation or now - _loaded_at > MAX_SNAPSHOT_AGE_SECONDS:
        with _lock:
            # Read after the generation: a change committed meanwhile moves it again.
            digests = frozenset(ApiToken.objects.filter(is_active=True).values_list("digest", flat=True))
            _digests, _generation, _loaded_at = digests, generation, now
    return digest in _digests


def _cache_is_shared() -> bool:
    from django.core.cache.backends.dummy import DummyCache
    from django.core.cache.backends.locmem import LocMemCache

    return not isinstance(cache, LocMemCache | DummyCache)


def _new_generation() -> None:
    try:
        cache.set(GENERATION_KEY, uuid.uuid4().hex, timeout=None)
    except Exception as exc:
        # Processes then see the change when their copy expires (MAX_SNAPSHOT_AGE_SECONDS), or at
        # once if the cache lost the key (e.g. make run's first start: its Redis is not up yet).
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
