"""Shared fixtures: API tokens and clients, and real Celery workers, beat and web servers
started as subprocesses (tests/processes.py) against the test database and the real broker."""

import os
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from project.celery import app as celery_app
from tests import processes, resources


@pytest.fixture(autouse=True)
def _plain_static_storage(settings):
    # The manifest storage needs collectstatic; tests render pages without that build step.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture(autouse=True)
def _fast_password_hashing(request, settings):
    # PBKDF2 is slow by design (about 0.3 s a password here): every admin_client paid for it.
    # Which hasher stores a password is Django's business, not a behaviour of this project; but a
    # process a test starts checks passwords with the real settings, so those tests keep them.
    if not any(request.node.get_closest_marker(marker) for marker in processes.SUBPROCESS_MARKERS):
        settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _project_app_is_current():
    # Shared tasks publish through the current app, and importing project.flower_app (as a test
    # of its constants does) makes Flower's app current for good: each test starts from ours.
    celery_app.set_current()


def make_api_token(scope: str = "manage", **fields) -> str:
    """A new API token's secret: held by a new user, with every right (manage) unless told."""
    from django.contrib.auth import get_user_model

    from app import services

    name = f"test-{uuid.uuid4().hex[:8]}"
    owner = get_user_model().objects.create_user(username=name)
    _token, secret = services.create_api_token(name=name, owner=owner, scope=scope, **fields)
    return secret


@pytest.fixture
def api_token(db) -> str:
    return make_api_token()


@pytest.fixture
def api(client, api_token):
    """A test client that sends the bearer token (reads too) and JSON bodies."""

    class ApiClient:
        def post(self, path, body=None, token=api_token, headers=None):
            headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
            return client.post(path, body if body is not None else {}, content_type="application/json", headers=headers)

        def get(self, path, token=api_token):
            return client.get(path, headers={"Authorization": f"Bearer {token}"} if token else {})

    return ApiClient()


# --- Real workers, beat and web (tests/processes.py) ------------------------------------


def pytest_configure(config):
    processes.refuse_unmarked_subprocesses()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """make test's --dist loadgroup sends the tests of one xdist_group to one process because the
    group's name ends their node ids. pytest-xdist 3.8 appends it to `item._nodeid`, which pytest 9
    no longer reads (a node id is `item._id` now): without this, every group is silently split."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist's processes only
        return
    from _pytest.nodeid import NodeId

    for item in items:
        marks = item.iter_markers("xdist_group")
        groups = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default")) for mark in marks})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The marker checks (tests/processes.py) know the test whose fixtures, body and teardown run."""
    processes.running_test = item
    try:
        return (yield)
    finally:
        processes.running_test = None


@pytest.fixture
def redis_url() -> str:
    """A database of the suite's Redis of this test's own, emptied before and after (tests/resources.py)."""
    with resources.empty_redis_db() as url:
        yield url


@pytest.fixture(scope="session")
def service_log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="module")
def redis_worker(django_db_setup, django_db_blocker, service_log_dir):
    """A real prefork worker (concurrency 2) on this process's Redis broker, consuming default and
    long. It empties them as it starts and stops with its module: tasks other tests queued
    without a worker never run against the test database behind their back."""
    with django_db_blocker.unblock():
        service = processes.start_worker(
            celery_app, broker_url=os.environ["CELERY_BROKER_URL"], log_dir=service_log_dir
        )
    yield service
    service.stop()


def celery_app_for(broker_url: str, **conf):
    """A second Celery app with the project's settings but another broker.

    Celery reads broker_url from the CELERY_BROKER_URL variable before any setting, and that
    variable names the suite's Redis; the read and write URLs are taken from settings first."""
    from celery import Celery

    # Not made the current app: shared tasks in later tests would publish to its broker.
    app = Celery("project", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.broker_read_url = app.conf.broker_write_url = broker_url
    if not broker_url.startswith(("redis://", "rediss://", "sentinel://")):
        # The settings chose the Redis transport (app/redis_transport.py) for the suite's broker,
        # and no RabbitMQ queues: those a worker on this broker declares (project/settings.py).
        from django.conf import settings

        from app import rabbitmq_queues

        app.conf.broker_transport = None
        app.conf.broker_transport_options = {"confirm_publish": True}
        app.conf.update(
            rabbitmq_queues.celery_settings(
                settings.TASK_QUEUE_NAMES,
                queue_type=settings.RABBITMQ_QUEUE_TYPE,
                delivery_limit=settings.RABBITMQ_DELIVERY_LIMIT,
            )
        )
    app.conf.update(conf)
    app.broker_url_for_workers = broker_url
    return app


@pytest.fixture(scope="session")
def amqp_app():
    url = os.environ.get("RABBITMQ_URL")
    if not url:
        pytest.skip("RABBITMQ_URL not set: the RabbitMQ broker tests need a running RabbitMQ")
    return celery_app_for(url, broker_transport_options={})


@pytest.fixture(scope="module")
def amqp_worker(amqp_app, django_db_setup, django_db_blocker, service_log_dir):
    """A worker on the shared RabbitMQ's task queues; stopped with its module, so the RabbitMQ
    tests of another module (one xdist group, one process) never share the queues with it."""
    with django_db_blocker.unblock():
        service = processes.start_worker(amqp_app, broker_url=amqp_app.broker_url_for_workers, log_dir=service_log_dir)
    yield service
    service.stop()


@pytest.fixture
def task_history(transactional_db):
    """A history recorder, in a thread of this process, folding the stored states of this test's
    tasks into TaskLog (beat runs one in production). The stream starts empty: states stored by
    earlier tests are not this test's history."""
    import threading

    from app import history_recorder

    client, stream = celery_app.backend.history_stream_client()
    client.delete(stream)
    recorder = history_recorder.HistoryRecorder(
        client=client,
        stream=stream,
        settings=history_recorder.RecorderSettings(block_seconds=0.1),
        consumer=f"tests-{uuid.uuid4().hex[:6]}",
    )
    thread = threading.Thread(target=recorder.run, name="test-history-recorder", daemon=True)
    thread.start()
    yield recorder
    recorder.stop()
    thread.join(timeout=10)


@dataclass
class BrokerUnderTest:
    app: object
    worker_hostname: str


# Every worker on the shared RabbitMQ consumes the same queues: a parallel run keeps the tests that
# use one in a single pytest-xdist process (--dist loadgroup), or one would take another's tasks.
RABBITMQ_GROUP = pytest.mark.xdist_group("rabbitmq")


@pytest.fixture(params=["redis", pytest.param("amqp", marks=RABBITMQ_GROUP)])
def broker(request):
    """Run a pattern test once per broker: the same code, only the broker URL differs.

    Shared tasks resolve to the yielded app while the test runs, so they publish to its broker."""
    if request.param == "redis":
        worker = request.getfixturevalue("redis_worker")
        yield BrokerUnderTest(celery_app, worker.hostname)
        return
    app = request.getfixturevalue("amqp_app")
    worker = request.getfixturevalue("amqp_worker")
    app.set_current()
    try:
        yield BrokerUnderTest(app, worker.hostname)
    finally:
        celery_app.set_current()


@pytest.fixture
def start_beat(service_log_dir, tmp_path):
    """Start beat with environment overrides (tests/processes.py); stopped after the test."""
    started = []

    def start(**env_overrides) -> processes.Service:
        started.append(processes.start_beat(log_dir=service_log_dir, workdir=tmp_path, **env_overrides))
        return started[-1]

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def start_web(service_log_dir, tmp_path):
    """Start gunicorn (tests/processes.py) with environment overrides, stopped after the test;
    returns its base URL."""
    started = []

    def start(**env_overrides) -> str:
        started.append(processes.start_web(log_dir=service_log_dir, workdir=tmp_path, **env_overrides))
        return started[-1].url

    yield start
    for service in started:
        service.stop()


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    """A plain HTTP call; returns (status, body bytes) for any status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until(predicate, *, timeout: float = 30, interval: float = 0.1, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


@pytest.fixture
def fresh_database_url():
    """An empty PostgreSQL database next to the test one, dropped afterwards."""
    import psycopg

    parts = urlsplit(os.environ["DATABASE_URL"])
    query = dict(pair.split("=", 1) for pair in parts.query.split("&") if pair)
    params = {
        "host": parts.hostname or query.get("host"),
        "port": parts.port or 5432,
        "user": parts.username or "postgres",
        "password": parts.password or None,
        "dbname": parts.path.lstrip("/") or "postgres",
        "autocommit": True,
    }
    name = f"fresh_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(**params) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(**params) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Figures measured during the run (image size, build and start-up times), printed at the end.
FIGURES: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("measured")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
