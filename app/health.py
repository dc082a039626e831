"""The single definition of "healthy": database, cache, broker and result backend.

Used by the health_check task (run by workers on a schedule) and by GET /api/health/ and
/api/health/ready (the web readiness probe, through run_checks_cached).
"""

import threading
import time
import uuid
from collections.abc import Callable

from django.core.cache import cache
from django.db import connection

CHECK_TIMEOUT_SECONDS = 2.0


def check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def check_cache() -> None:
    key, value = f"health:{uuid.uuid4().hex}", "ok"
    cache.set(key, value, timeout=10)
    if cache.get(key) != value:
        raise RuntimeError("cache did not return the value just written")
    cache.delete(key)


def check_broker() -> None:
    from project.celery import app as celery_app

    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_SECONDS)


def check_result_backend() -> None:
    from project.celery import app as celery_app

    # A result that was never stored reads as PENDING: proves the backend answers queries.
    meta = celery_app.backend.get_task_meta(f"health-{uuid.uuid4().hex}")
    if meta.get("status") != "PENDING":
        raise RuntimeError(f"unexpected state {meta.get('status')!r} for an unknown task id")


CHECKS: dict[str, Callable[[], None]] = {
    "database": check_database,
    "cache": check_cache,
    "broker": check_broker,
    "result_backend": check_result_backend,
}


def run_checks() -> dict:
    """Run every check; never raises. {"healthy": bool, "checks": {name: {...}}}."""
    results = {}
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            check()
        except Exception as exc:
            results[name] = {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            results[name] = {"healthy": True}
        results[name]["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return {"healthy": all(r["healthy"] for r in results.values()), "checks": results}


_cache_lock = threading.Lock()
_cached: tuple[float, dict] | None = None


def run_checks_cached() -> dict:
    """run_checks(), reused for HEALTH_READY_CACHE_SECONDS in this process: however many probes
    and threads ask, at most one round of checks per interval reaches the dependencies."""
    global _cached
    from django.conf import settings

    with _cache_lock:
        if _cached is None or time.monotonic() - _cached[0] >= settings.HEALTH_READY_CACHE_SECONDS:
            _cached = (time.monotonic(), run_checks())
        return _cached[1]
