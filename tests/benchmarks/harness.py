"""What every benchmark needs: the servers (the given ones, or embedded), a private database,
Celery workers and recorders started as the image starts them, and CPU accounting.

Figures from one run are read as ratios: these machines are noisy, so modes are interleaved
and repeated, and medians compared side by side.
"""

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
QUEUE = "bench"
# A finished task in a worker's log: Celery's own line (bare and stock Celery), or the project's
# one line per run (its workers log Celery's per-task lines only with LOG_CELERY_TASK_LINES).
SUCCEEDED = " succeeded in "
FINISHED = '"event": "task_finished"'
# Celery's plain format ("[2026-11-25 01:02:03,456: INFO/...") or structlog's ISO timestamps.
TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)[,.](\d{3})")


@dataclass
class Servers:
    """PostgreSQL and Redis URLs: DATABASE_URL / REDIS_URL when set, else embedded ones."""

    database_url: str
    redis_url: str
    workdir: Path
    started: list = field(default_factory=list)

    def redis(self, db: int) -> str:
        return f"{self.redis_url.rstrip('/')}/{db}"

    def private_redis(self):
        """A redis-server of its own (its CPU time is then the cost of one role alone)."""
        from project.embedded import EmbeddedRedis

        server = EmbeddedRedis(workdir=self.workdir).start()
        self.started.append(server)
        return server


def setup_django() -> None:
    """The benchmark process reads the project's constants (stream names, tasks): Django set up
    with a throwaway key; it never serves anything."""
    import logging

    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench")
    django.setup()
    logging.disable(logging.INFO)  # no line per task this process publishes


# The image's packages alone (requirements.txt, `make bench` installs them): start-up and memory
# are measured with them, as the image runs. The development set adds packages that other
# packages import when they find them (structlog imports rich: a twentieth of a second).
RUNTIME_PYTHON = REPO_ROOT / ".venv" / "runtime" / "bin" / "python"


def runtime_python() -> str:
    """The image's interpreter and packages where `make bench` made them, else this one."""
    return str(RUNTIME_PYTHON) if RUNTIME_PYTHON.exists() else sys.executable


def compile_like_the_image() -> None:
    """Bytecode for the project's own modules, as the image has it (Dockerfile: compileall).
    With PYTHONDONTWRITEBYTECODE set (these machines set it) every role started here would
    otherwise compile them at each start (measured: a tenth of a second of the web's start-up),
    which no deployed role does. Installed packages have theirs from pip."""
    import compileall

    for folder in ("app", "project", "tests/benchmarks"):
        compileall.compile_dir(REPO_ROOT / folder, quiet=1)


@contextmanager
def servers():
    from project.embedded import EmbeddedPostgres, EmbeddedRedis

    setup_django()
    compile_like_the_image()
    workdir = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    started = []
    try:
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            started.append(EmbeddedPostgres(workdir / "pg" / "data").start())
            database_url = started[-1].url
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            started.append(EmbeddedRedis(workdir=workdir).start())
            redis_url = started[-1].url
        found = Servers(database_url=database_url, redis_url=redis_url, workdir=workdir, started=started)
        yield found
    finally:
        for server in reversed(started):
            server.stop()


@contextmanager
def otlp_sink():
    """An OTLP/HTTP endpoint on loopback that takes every export and throws it away: what
    tracing costs the traced process, without a collector's work on the same machine. Yields
    its base URL (OTEL_EXPORTER_OTLP_ENDPOINT)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _admin_connection(database_url: str):
    import psycopg

    parts = urlsplit(database_url)
    query = dict(pair.split("=", 1) for pair in parts.query.split("&") if pair)
    return psycopg.connect(
        host=parts.hostname or query.get("host"),
        port=parts.port or 5432,
        user=parts.username or "postgres",
        password=parts.password or None,
        dbname=parts.path.lstrip("/") or "postgres",
        autocommit=True,
    )


def fresh_database(database_url: str, name: str = "celery_bench") -> str:
    """An empty, migrated database next to the given one."""
    with _admin_connection(database_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    env = {**os.environ, **base_env(url, "redis://127.0.0.1:1/0", Path(tempfile.gettempdir()))}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO_ROOT, env=env, check=True)
    return url


def history_rows(database_url: str) -> int:
    """TaskLog rows in a final state."""
    with _admin_connection(database_url) as conn:
        (count,) = conn.execute("SELECT count(*) FROM app_tasklog WHERE state IN ('SUCCESS', 'FAILURE')").fetchone()
    return count


def database_done_stamps(database_url: str) -> list[datetime]:
    """When each result the database backend stored was stored."""
    with _admin_connection(database_url) as conn:
        rows = conn.execute("SELECT date_done FROM django_celery_results_taskresult WHERE status = 'SUCCESS'")
        return [done.replace(tzinfo=None) for (done,) in rows.fetchall()]


def delete_queue(broker_url: str, queue: str = QUEUE) -> None:
    """Delete a queue of an AMQP broker and its dead-letter queue (a Redis one is emptied with its
    database)."""
    from kombu import Connection

    from app.rabbitmq_queues import dead_letter_queue_name

    with Connection(broker_url) as conn:
        for name in (queue, dead_letter_queue_name(queue)):
            with conn.channel() as channel:
                channel.queue_delete(name)  # nothing to delete is no error


def truncate_history(database_url: str) -> None:
    with _admin_connection(database_url) as conn:
        conn.execute("TRUNCATE app_tasklog, django_celery_results_taskresult, django_celery_results_chordcounter")


def base_env(database_url: str, broker_url: str, workdir: Path, **extra) -> dict:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "DJANGO_SECRET_KEY": "bench",
        "DJANGO_DEBUG": "false",
        "PYTHONPATH": str(REPO_ROOT),
        "CELERY_METRICS_PORT": "0",  # the per-task cost is in the handlers, not the idle server
        "PROMETHEUS_MULTIPROC_BASE_DIR": str(workdir / "prometheus"),
        "LOG_FORMAT": "json",
    }
    env.pop("RESULT_BACKEND_URL", None)
    env.update({key: str(value) for key, value in extra.items()})
    return env


def worker_command(
    app: str, concurrency: int = 2, queues: str = QUEUE, name: str | None = None, python: str = sys.executable
) -> list[str]:
    """The worker the image runs (deploy/image/entrypoint.sh), on the benchmark's queue."""
    command = [
        python, "-m", "celery", "-A", app, "worker", "-Q", queues, "-c", str(concurrency),
        "--pool", "prefork", "--without-mingle", "--without-gossip", "-l", "info",
    ]  # fmt: skip
    return [*command, "-n", name] if name else command


class Process:
    """A child process in its own session, output to a log file."""

    def __init__(self, command: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()


def succeeded_stamps(log: str) -> list[datetime]:
    return [
        datetime.strptime(" ".join(TIMESTAMP.search(line).groups()), "%Y-%m-%d %H:%M:%S %f")
        for line in log.splitlines()
        if SUCCEEDED in line and TIMESTAMP.search(line)
    ]


def finished_count(log: str) -> int:
    return log.count(SUCCEEDED) + log.count(FINISHED)


def done_stamps(redis_url: str) -> list[datetime]:
    """When each stored result was stored (date_done, set by the worker that ran the task)."""
    import json

    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match="celery-task-meta-*", count=1000))
    stamps = []
    for start in range(0, len(keys), 1000):
        for raw in client.mget(keys[start : start + 1000]):
            done = json.loads(raw).get("date_done") if raw else None
            if done:
                stamps.append(datetime.fromisoformat(done).replace(tzinfo=None))
    return stamps


def rate_between_first_and_last(stamps: list[datetime]) -> float:
    """Tasks per second from the first to the last completion (worker side)."""
    return (len(stamps) - 1) / (max(stamps) - min(stamps)).total_seconds()


def fill_queue(broker_url: str, name: str, count: int, queue: str = QUEUE, **conf) -> None:
    from celery import Celery

    publisher = Celery(broker=broker_url, set_as_current=False)
    publisher.conf.update(conf)
    # A connection of its own: kombu's pooled ones, shared by every app of this process on the
    # same broker, remember queues as declared, and a queue deleted since would not be again.
    with publisher.connection_for_write() as connection, connection.Producer() as producer:
        for i in range(count):
            publisher.send_task(name, args=[i, 1], queue=queue, producer=producer)
    publisher.close()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their live children."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for member in [process, *process.children(recursive=True)]:
                times = member.cpu_times()
                total += (
                    times.user
                    + times.system
                    + getattr(times, "children_user", 0)
                    + getattr(times, "children_system", 0)
                )
        except psutil.NoSuchProcess:
            continue
    return total


def postgres_cpu_seconds() -> float:
    """CPU of every PostgreSQL server process on this machine (embedded or not)."""
    import psutil

    total = 0.0
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if process.info["name"] in ("postgres", "postmaster") or "postgres" in (process.info["name"] or ""):
                times = process.cpu_times()
                total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def median(values) -> float:
    return statistics.median(values)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def wait_ready(worker: Process, timeout: float = 60) -> float:
    """Seconds from the worker's start to its "ready." log line."""
    deadline = time.monotonic() + timeout
    while " ready." not in worker.log():
        if not worker.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{worker.log()[-2000:]}")
        time.sleep(0.01)
    return time.monotonic() - worker.started
