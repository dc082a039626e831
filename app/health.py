"""The single definition of "healthy": database, cache, broker and result backend.

Used by the health_check task (run by workers on a schedule) and by GET /api/health/ and
/api/health/ready (the web readiness probe, through run_checks_cached). Those endpoints are public:
a report names each check and its state, never an error's text (host names, ports, driver
messages); the text goes to the log, one line per failing check.
"""

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from django.core.cache import cache
from django.db import close_old_connections, connection

logger = logging.getLogger(__name__)

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


# A check's state in a report: it passed, it raised (the log line says why), or the round of
# checks did not finish within HEALTH_READY_TIMEOUT_SECONDS (readiness only).
OK, FAILING, TIMED_OUT = "ok", "failing", "timed out"


def run_checks() -> dict:
    """Run every check; never raises.

    {"healthy": bool, "checks": {name: {"healthy": bool, "state": "ok"|"failing", "latency_ms": float}}}
    """
    results = {}
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            check()
        except Exception as exc:
            logger.warning("health check %s failing: %s: %s", name, type(exc).__name__, exc)
            results[name] = {"healthy": False, "state": FAILING}
        else:
            results[name] = {"healthy": True, "state": OK}
        results[name]["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return {"healthy": all(r["healthy"] for r in results.values()), "checks": results}


def _timed_out() -> dict:
    return {"healthy": False, "checks": {name: {"healthy": False, "state": TIMED_OUT} for name in CHECKS}}


_lock = threading.Lock()
_cached: tuple[float, dict] | None = None
_running: Future | None = None
# One thread per process runs the readiness checks, so a request waits for them at most
# HEALTH_READY_TIMEOUT_SECONDS even when a dependency hangs instead of refusing.
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readiness-checks")


def _checks_in_thread() -> dict:
    try:
        # This thread serves no requests, so nothing else drops its broken or expired connections.
        close_old_connections()
    except Exception:
        logger.exception("Could not close the readiness thread's old database connections")
    return run_checks()


def run_checks_cached() -> dict:
    """run_checks(), reused for HEALTH_READY_CACHE_SECONDS in this process: however many probes
    and threads ask, at most one round of checks at a time reaches the dependencies, and none
    waits longer than HEALTH_READY_TIMEOUT_SECONDS (a round still running then is unhealthy)."""
    global _cached, _running
    from django.conf import settings

    with _lock:
        if _cached is not None and time.monotonic() - _cached[0] < settings.HEALTH_READY_CACHE_SECONDS:
            return _cached[1]
        if _running is None:
            _running = _executor.submit(_checks_in_thread)
        running = _running
    try:
        report = running.result(timeout=settings.HEALTH_READY_TIMEOUT_SECONDS)
    except FutureTimeout:
        logger.warning(
            "health checks still running after %s s: a dependency hangs", settings.HEALTH_READY_TIMEOUT_SECONDS
        )
        return _timed_out()
    with _lock:
        if _running is running:
            _cached, _running = (time.monotonic(), report), None
    return report
