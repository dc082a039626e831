"""Shared fixtures: API tokens and clients, and real Celery workers, beat and web servers
started as subprocesses against the test database and the real broker."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import connection

from project.celery import app as celery_app
from project.embedded import free_port, wait_for_port

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _plain_static_storage(settings):
    # The manifest storage needs collectstatic; tests render pages without that build step.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


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


# --- Subprocesses against the test database ---------------------------------------------


def database_url_for_subprocess() -> str:
    """DATABASE_URL with the database name pytest-django created for this run."""
    parts = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(parts._replace(path="/" + connection.settings_dict["NAME"]))


def subprocess_env(**overrides) -> dict:
    """The test process's environment for a child: the test database, and this process's result
    backend (a worker on another broker still stores states where the tests read them)."""
    from django.conf import settings

    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocess(),
        "RESULT_BACKEND_URL": settings.RESULT_BACKEND_URL,
        "PYTHONUNBUFFERED": "1",
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


class Service:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, command: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


@contextmanager
def empty_redis_db(db: int):
    """The URL of database `db` of the suite's Redis, emptied before and after: a test's own keys."""
    import redis

    url = f"{os.environ['REDIS_URL'].rstrip('/')}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()


def wait_for_worker(app, hostname: str, service: Service, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{service.log()[-3000:]}")
        if app.control.ping(destination=[hostname], timeout=0.5):
            return
    raise TimeoutError(f"worker {hostname} not ready after {timeout} s:\n{service.log()[-3000:]}")


@pytest.fixture(scope="session")
def service_log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


def start_worker(
    app,
    *,
    broker_url: str,
    log_dir: Path,
    concurrency: int = 2,
    app_module: str = "project",
    queues: str = "default,long",
    purge: bool = True,
    wait: bool = True,
    **env,
) -> Service:
    """A prefork worker on `broker_url` consuming `queues`, ready to take tasks (without `wait`:
    just started); with `purge`, it empties them as it starts (tasks of earlier tests are not its)."""
    hostname = f"test-{uuid.uuid4().hex[:8]}@localhost"
    command = [
        sys.executable, "-m", "celery", "-A", app_module, "worker",
        "-Q", queues, "-c", str(concurrency), "--pool", "prefork",
        "-n", hostname, "--without-mingle", "--without-gossip", "-E", "-l", "info", *(["--purge"] if purge else []),
    ]  # fmt: skip
    service = Service(
        f"worker-{hostname.split('@')[0]}", command, subprocess_env(CELERY_BROKER_URL=broker_url, **env), log_dir
    )
    service.hostname = hostname
    if not wait:
        return service
    try:
        wait_for_worker(app, hostname, service)
    except BaseException:
        service.stop()  # not left behind to take the next tests' tasks
        raise
    return service


@pytest.fixture(scope="session")
def redis_worker(django_db_setup, django_db_blocker, service_log_dir):
    """A real prefork worker (concurrency 2) on the Redis broker, consuming default and long."""
    with django_db_blocker.unblock():
        service = start_worker(celery_app, broker_url=os.environ["CELERY_BROKER_URL"], log_dir=service_log_dir)
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


@pytest.fixture(scope="session")
def amqp_worker(amqp_app, django_db_setup, django_db_blocker, service_log_dir):
    with django_db_blocker.unblock():
        service = start_worker(amqp_app, broker_url=amqp_app.broker_url_for_workers, log_dir=service_log_dir)
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


@pytest.fixture(params=["redis", "amqp"])
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
    started = []

    def start(**env_overrides) -> Service:
        command = [
            sys.executable, "-m", "celery", "-A", "project", "beat", "-l", "info",
            "-s", str(tmp_path / "celerybeat-schedule"),
        ]  # fmt: skip
        service = Service(f"beat-{uuid.uuid4().hex[:6]}", command, subprocess_env(**env_overrides), service_log_dir)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def start_web(service_log_dir):
    """Start gunicorn on a free loopback port with environment overrides; returns its base URL."""
    started = []

    def start(**env_overrides) -> str:
        port = free_port()
        command = [
            sys.executable, "-m", "gunicorn", "project.wsgi", "--bind", f"127.0.0.1:{port}",
            "--workers", "1", "--no-control-socket",
        ]  # fmt: skip
        service = Service(f"web-{port}", command, subprocess_env(**env_overrides), service_log_dir)
        started.append(service)
        wait_for_port(port, timeout=30, process=service.process)
        return f"http://127.0.0.1:{port}"

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
