"""The real image, built with podman from the real Dockerfile, each role run as Kubernetes
runs it: read-only root filesystem, numeric non-root user, only /tmp writable, host network,
against the suite's PostgreSQL and Redis.

Skipped, with the reason, where podman is missing (tests/container/README.md) or where the
database and Redis are not reachable over TCP from a container (CI gives TCP URLs)."""

import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
from celery.result import AsyncResult
from django.conf import settings

import project
from app import workflows
from app.models import TaskLog, TaskState
from project.embedded import wait_for_port
from tests.conftest import FIGURES, celery_app_for, http, wait_until
from tests.container import podman
from tests.processes import REPO_ROOT, database_url_for_subprocess
from tests.resources import empty_redis_db, free_port

# The first test also builds the image (cold: about two minutes with the stand-in base); in a
# parallel run every test here runs in one pytest-xdist process, so the image is built once.
pytestmark = [
    pytest.mark.container,
    pytest.mark.xdist_group("podman"),
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(900),
]

IMAGE = f"localhost/django-celery-k8s:{project.__version__}-test"


def tcp_url(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.hostname) and "host=" not in parts.query


@pytest.fixture(scope="session")
def image() -> str:
    available, why = podman.podman_available()
    if not available:
        pytest.skip(f"podman cannot run containers here: {why}")
    for name in ("DATABASE_URL", "REDIS_URL"):
        if not tcp_url(os.environ.get(name, "")):
            pytest.skip(f"{name} is not a TCP URL: containers reach the database and Redis over the network")
    base_seconds = podman.ensure_standin_base()
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    seconds, size = podman.build_image(
        REPO_ROOT, IMAGE, {"VERSION": project.__version__, "REVISION": revision or "unknown"}
    )
    FIGURES["stand-in base image"] = "cached" if base_seconds == 0 else f"built in {base_seconds:.1f} s"
    FIGURES["image build"] = f"{seconds:.1f} s (layers cached from earlier runs where unchanged)"
    FIGURES["image size"] = f"{size / 1e6:.0f} MB"
    return IMAGE


@pytest.fixture(scope="module")
def container_app():
    """On a broker database of its own, so the suite's worker never takes the containers' tasks."""
    with empty_redis_db() as broker:
        yield celery_app_for(broker)


@pytest.fixture
def containers():
    """Starts containers and removes them after the test, printing the logs of any that failed."""
    names = []

    def start(role: str, *args: str, env: dict | None = None, **options) -> str:
        name = f"cdemo-{role}-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return podman.run_container(IMAGE, [role, *args], env=env, name=name, **options)

    yield start
    for name in names:
        podman.rm(name)


@pytest.fixture
def role_env(container_app):
    def make(**extra) -> dict:
        return {
            "DATABASE_URL": database_url_for_subprocess(),
            "CELERY_BROKER_URL": container_app.broker_url_for_workers,
            # States where this process reads them (and its history recorder, or beat's, finds them).
            "RESULT_BACKEND_URL": settings.RESULT_BACKEND_URL,
            "CACHE_URL": os.environ["CACHE_URL"],
            "DJANGO_SECRET_KEY": "container-tests-only",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            # The containers share the host's network: no metrics server on the chart's fixed port,
            # which a parallel test's process or another container may hold.
            "CELERY_METRICS_PORT": "0",
            "WEB_METRICS_PORT": "0",
            "FLOWER_METRICS_PORT": "0",
            **{key: str(value) for key, value in extra.items()},
        }

    return make


@pytest.fixture
def start_worker_container(containers, role_env, container_app):
    """A worker container; returns its Celery hostname once it answers a ping."""

    def start(**extra) -> tuple[str, str]:
        worker_name = f"container-{uuid.uuid4().hex[:6]}"
        started = time.monotonic()
        name = containers("worker", env=role_env(CELERY_WORKER_NAME=worker_name, CELERY_WORKER_CONCURRENCY=2, **extra))

        def answering():
            if podman.podman("container", "exists", name, check=False).returncode != 0:
                raise AssertionError(f"worker container is gone:\n{podman.logs(name)[-3000:]}")
            replies = container_app.control.ping(timeout=0.5)
            return next((host for reply in replies for host in reply if host.startswith(worker_name + "@")), None)

        hostname = wait_until(answering, timeout=90, interval=0.5, message="the worker container to answer a ping")
        FIGURES.setdefault("worker container start to ping reply", f"{time.monotonic() - started:.1f} s")
        return name, hostname

    return start


@pytest.fixture
def published_through(container_app):
    """Shared tasks publish to the containers' broker while the test runs."""
    from project.celery import app as celery_app

    container_app.set_current()
    yield container_app
    celery_app.set_current()


def test_image_runs_as_a_numeric_non_root_user_with_labels_and_no_compilers(image):
    config = json.loads(podman.podman("image", "inspect", image).stdout)[0]["Config"]

    assert config["User"] == "10001:10001"
    assert config["Labels"]["org.opencontainers.image.version"] == project.__version__
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", config["Labels"]["org.opencontainers.image.revision"])
    assert config["Entrypoint"] == ["/app/entrypoint.sh"]
    probe = podman.podman(
        "run", "--rm", "--network=host", "--read-only", "--entrypoint", "sh", image, "-c",
        "id -u; for tool in gcc cc make; do command -v $tool && exit 3; done; ls /app",
        check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stdout
    assert probe.stdout.splitlines()[0] == "10001"
    assert "tests" not in probe.stdout.split()


def test_web_serves_health_docs_and_static_files(image, containers, role_env):
    port = free_port()
    started = time.monotonic()
    name = containers("web", env=role_env(PORT=port, WEB_CONCURRENCY=2))
    wait_for_port(port, timeout=60)
    status, body = wait_until(
        lambda: (lambda r: r if r[0] == 200 else None)(http("GET", f"http://127.0.0.1:{port}/api/health/")),
        timeout=60,
        message="health 200",
    )
    FIGURES.setdefault("web container start to first 200", f"{time.monotonic() - started:.1f} s")

    assert json.loads(body)["healthy"] is True
    status, docs = http("GET", f"http://127.0.0.1:{port}/api/docs")
    assert status == 200, podman.logs(name)[-2000:]
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', docs.decode())
    assert any("swagger-ui-bundle" in asset for asset in assets)
    for asset in assets:
        asset_status, content = http("GET", f"http://127.0.0.1:{port}{asset}")
        assert (asset, asset_status) == (asset, 200)
        assert content


def test_worker_runs_a_task_and_a_chord(image, start_worker_container, published_through, task_history):
    from app.tasks import add

    _name, hostname = start_worker_container()

    assert add.delay(2, 3).get(timeout=60) == 5
    started = workflows.start_chord(chunks=[[1, 2], [3, 4], [5]])
    summary = AsyncResult(started.task_id, app=published_through).get(timeout=60)

    assert (summary["count"], summary["sum"]) == (5, 15)
    log = wait_until(lambda: TaskLog.objects.filter(task_id=started.task_id, state=TaskState.SUCCESS).first())
    assert log.worker == hostname


def test_beat_ticks_and_its_scheduled_task_runs(image, containers, role_env, start_worker_container):
    from app import services
    from app.models import ScheduledTask

    _worker, hostname = start_worker_container()
    marker = int(time.time()) % 100_000
    services.save_scheduled_task(
        ScheduledTask(name=f"container-beat-{marker}", task="app.tasks.add", interval_seconds=1, args=[marker, 2])
    )
    beat = containers("beat", env=role_env())

    runs = wait_until(
        lambda: list(TaskLog.objects.filter(args=[marker, 2], state=TaskState.SUCCESS)) or None,
        timeout=60,
        interval=0.5,
        message=f"beat's scheduled task to run:\n{podman.logs(beat)[-2000:]}",
    )
    assert runs[0].worker == hostname
    assert "beat: Starting" in podman.logs(beat)


def test_flower_answers_with_credentials_and_refuses_without(image, containers, role_env):
    port = free_port()
    containers("flower", env=role_env(FLOWER_BASIC_AUTH="ops:s3cret", FLOWER_PORT=port))
    wait_for_port(port, timeout=60)
    url = f"http://127.0.0.1:{port}/"

    assert http("GET", url)[0] == 401
    assert http("GET", url, headers={"Authorization": "Basic b3BzOnMzY3JldA=="})[0] == 200  # ops:s3cret

    # Behind an ingress path: FLOWER_URL_PREFIX (read by Flower itself).
    prefixed_port = free_port()
    containers(
        "flower", env=role_env(FLOWER_BASIC_AUTH="ops:s3cret", FLOWER_PORT=prefixed_port, FLOWER_URL_PREFIX="flower")
    )
    wait_for_port(prefixed_port, timeout=60)
    prefixed = f"http://127.0.0.1:{prefixed_port}/flower/"
    assert http("GET", prefixed, headers={"Authorization": "Basic b3BzOnMzY3JldA=="})[0] == 200

    unauthenticated = containers("flower", env=role_env(FLOWER_PORT=free_port()))
    assert podman.wait(unauthenticated, timeout=60) == 64
    assert "refusing to start without authentication" in podman.logs(unauthenticated)


def test_two_migrate_containers_started_at_once_both_exit_0(image, containers, role_env, fresh_database_url):
    env = role_env(DATABASE_URL=fresh_database_url)
    first, second = containers("migrate", env=env), containers("migrate", env=env)

    codes = [podman.wait(first, timeout=300), podman.wait(second, timeout=300)]

    assert codes == [0, 0], podman.logs(first)[-2000:] + podman.logs(second)[-2000:]


def test_sigterm_lets_the_running_task_finish_before_the_worker_exits(
    image, start_worker_container, published_through, task_history
):
    name, hostname = start_worker_container()
    started = workflows.start_long_running(total_steps=10, step_seconds=1.0)
    wait_until(
        lambda: TaskLog.objects.filter(task_id=started.task_id, state=TaskState.STARTED).exists(),
        timeout=60,
        message="the 10-second task to start",
    )

    podman.stop(name, timeout=60)  # SIGTERM; SIGKILL only after 60 s

    log = wait_until(lambda: TaskLog.objects.filter(task_id=started.task_id, state=TaskState.SUCCESS).first())
    assert log.worker == hostname
    assert AsyncResult(started.task_id, app=published_through).state == "SUCCESS"
    assert podman.wait(name) == 0
    assert "Warm shutdown" in podman.logs(name)


def test_sigterm_lets_a_slow_request_complete(image, containers, role_env, api_token):
    port = free_port()
    name = containers("web", env=role_env(PORT=port, WEB_CONCURRENCY=1))
    wait_for_port(port, timeout=60)
    wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/api/health/")[0] == 200, timeout=60, message="web ready")
    body = json.dumps({"x": 20, "y": 22}).encode()
    head = (
        f"POST /api/simple-task/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api_token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()

    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        client.sendall(head + body[:5])  # the request is in flight: its body arrives slowly
        time.sleep(0.5)
        stopper = threading.Thread(target=podman.stop, args=(name, 60))
        stopper.start()
        time.sleep(2)  # SIGTERM has reached gunicorn while the request waits for its body
        client.sendall(body[5:])
        response = b""
        while chunk := client.recv(65536):
            response += chunk
        stopper.join(timeout=90)

    assert response.startswith(b"HTTP/1.1 202"), response[:500]
    assert b'"task_id"' in response
    assert podman.wait(name) == 0
    logs = podman.logs(name)
    # The SIGTERM arrived while the request was in flight, and gunicorn shut down gracefully.
    assert "Handling signal: term" in logs
    assert logs.index("Handling signal: term") < logs.index('"path": "/api/simple-task/"')
