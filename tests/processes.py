"""The project's roles as child processes of a test: the one place that builds the command line of
a worker, beat and web (each as the image runs it), and Service, which runs a child with its
output in a log file.

What a test starts decides its marker, and `make test-fast` leaves out all three: a server or a
long-running process (Service and the servers in tests/) needs `integration` or `container`;
any other child process (a command run to its end: manage.py, python -c, kubectl...) at least
`subprocess`. A test that starts one unmarked fails with what to add.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from project.embedded import wait_for_port
from tests.resources import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_MARKERS = ("integration", "container")
SUBPROCESS_MARKERS = (*SERVER_MARKERS, "subprocess")

# The test being run (set by tests/conftest.py around each test), for the marker checks.
running_test: pytest.Item | None = None


def require_process_marker(what: str, markers: tuple[str, ...] = SERVER_MARKERS) -> None:
    """Fail the running test unless it carries one of `markers`: it starts `what`."""
    if running_test is None:
        return
    if not any(running_test.get_closest_marker(marker) for marker in markers):
        pytest.fail(
            f"{running_test.nodeid} starts {what}, so it must be marked {' or '.join(markers)} "
            f"(pytest.mark.{markers[0]}): make test-fast runs every test marked none of them",
            pytrace=False,
        )


def refuse_unmarked_subprocesses() -> None:
    """Every child process goes through subprocess.Popen: one started by a test marked none of
    SUBPROCESS_MARKERS fails that test."""
    popen_init = subprocess.Popen.__init__

    def init(self, args, *rest, **options):
        program = args if isinstance(args, str | os.PathLike) else " ".join(str(arg) for arg in args[:3])
        require_process_marker(f"a subprocess ({program})", SUBPROCESS_MARKERS)
        popen_init(self, args, *rest, **options)

    subprocess.Popen.__init__ = init


def database_url_for_subprocess() -> str:
    """DATABASE_URL with the database name pytest-django created for this run (and xdist process)."""
    from django.db import connection

    parts = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(parts._replace(path="/" + connection.settings_dict["NAME"]))


def subprocess_env(**overrides) -> dict:
    """The test process's environment for a child: the test database, this process's result
    backend (a worker on another broker still stores states where the tests read them), a
    runtime folder of its own (metrics files, health files, beat's heartbeat) and no metrics
    server on the chart's fixed ports unless a test asks for one: children of parallel tests
    never share a file or a port."""
    from django.conf import settings

    runtime_dir = tempfile.mkdtemp(prefix="runtime-", dir=os.environ.get("TESTS_SCRATCH_DIR"))
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocess(),
        "RESULT_BACKEND_URL": settings.RESULT_BACKEND_URL,
        "PYTHONUNBUFFERED": "1",
        "APP_RUNTIME_DIR": runtime_dir,
        "CELERY_METRICS_PORT": "0",
        "WEB_METRICS_PORT": "0",
        "FLOWER_METRICS_PORT": "0",
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


class Service:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, command: list[str], env: dict, log_dir: Path):
        require_process_marker(name)
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> None:
        """Stopped means every process of its group is gone: a gunicorn or Celery child that
        outlives its parent still holds the listening sockets, and a new server on the same port
        would answer through them until they close (a reset connection)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + timeout
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


def _group_alive(group: int) -> bool:
    """A process of this group that has not exited (a zombie has: PID 1 here reaps orphans only
    every few seconds)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(process_group) == group and state != "Z":
            return True
    return False


# --- Command lines ---------------------------------------------------------------------------


def celery_command(role: str, *, app_module: str = "project", quiet: bool = False) -> list[str]:
    """`worker` or `beat` as the image runs it (project/celery_command.py) for the project's app;
    Celery's own command for a test app."""
    flags = ["--quiet"] if quiet else []
    if app_module == "project":
        return [sys.executable, "-m", "project.celery_command", *flags, role]
    return [sys.executable, "-m", "celery", "-A", app_module, *flags, role]


def worker_command(
    *,
    hostname: str,
    queues: str = "default,long",
    concurrency: int = 2,
    pool: str = "prefork",
    app_module: str = "project",
    purge: bool = True,
    quiet: bool = False,
    options: tuple[str, ...] = (),
) -> list[str]:
    """A worker that is ready within a second (no mingle, no gossip) and sends task events."""
    return [
        *celery_command("worker", app_module=app_module, quiet=quiet),
        "-Q", queues, "-c", str(concurrency), "--pool", pool, "-n", hostname,
        "--without-mingle", "--without-gossip", "-E", "-l", "info", *(["--purge"] if purge else []), *options,
    ]  # fmt: skip


def beat_command(schedule_file: Path) -> list[str]:
    return [*celery_command("beat"), "-l", "info", "-s", str(schedule_file)]


def web_command() -> list[str]:
    """gunicorn as the image runs it: its port, workers and metrics listener from the environment
    (project/gunicorn_conf.py)."""
    return [sys.executable, "-m", "gunicorn", "-c", "python:project.gunicorn_conf", "project.wsgi"]


# --- Started and ready -----------------------------------------------------------------------


def new_hostname(name: str = "test") -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}@localhost"


def wait_for_worker(app, hostname: str, service: Service, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{service.log()[-3000:]}")
        if app.control.ping(destination=[hostname], timeout=0.5):
            return
    raise TimeoutError(f"worker {hostname} not ready after {timeout} s:\n{service.log()[-3000:]}")


def start_worker(
    app,
    *,
    broker_url: str,
    log_dir: Path,
    name: str = "test",
    concurrency: int = 2,
    app_module: str = "project",
    queues: str = "default,long",
    purge: bool = True,
    quiet: bool = False,
    options: tuple[str, ...] = (),
    wait: bool = True,
    **env,
) -> Service:
    """A prefork worker on `broker_url` consuming `queues`, ready to take tasks (without `wait`:
    just started); with `purge`, it empties them as it starts (tasks of earlier tests are not its).
    `.hostname` is its name for app.control."""
    hostname = new_hostname(name)
    command = worker_command(
        hostname=hostname,
        queues=queues,
        concurrency=concurrency,
        app_module=app_module,
        purge=purge,
        quiet=quiet,
        options=options,
    )
    service = Service(
        f"worker-{hostname.split('@')[0]}", command, subprocess_env(**{"CELERY_BROKER_URL": broker_url, **env}), log_dir
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


def start_beat(*, log_dir: Path, workdir: Path, **env) -> Service:
    """Beat with its schedule file in `workdir`; just started (nothing to wait for but what a test
    asks of it)."""
    name = f"beat-{uuid.uuid4().hex[:6]}"
    return Service(name, beat_command(workdir / f"{name}-schedule"), subprocess_env(**env), log_dir)


def start_web(
    *, log_dir: Path, workdir: Path, port: int | None = None, concurrency: int = 1, metrics_port: int = 0, **env
) -> Service:
    """gunicorn as the image runs it on `port` (a free one by default), answering: `.port`, `.url`."""
    port = port or free_port()
    defaults = {
        "PORT": port,
        "WEB_METRICS_PORT": metrics_port,
        "WEB_CONCURRENCY": concurrency,
        "GUNICORN_WORKER_TMP_DIR": workdir,
    }
    env = subprocess_env(**{**defaults, **env})
    service = Service(f"web-{port}", web_command(), env, log_dir)
    service.port, service.url = port, f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, timeout=30, process=service.process)
        if metrics_port:
            wait_for_port(metrics_port, timeout=30, process=service.process)
    except BaseException:
        service.stop()
        raise
    return service
