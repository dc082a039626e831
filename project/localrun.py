"""`make run`: the whole system on one machine with nothing but Python, for development.

Prepares the SQLite database, then runs an embedded Redis, gunicorn, a Celery worker, beat and
Flower under honcho's Manager with prefixed output. Ctrl-C (or SIGTERM) stops them all.
"""

import datetime as dt
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import environ
from honcho.compat import ProcessManager
from honcho.manager import Manager
from honcho.printer import Message, Printer

from project import environment
from project.embedded import EmbeddedRedis

BASE_DIR = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 120


class LeaderFirstProcessManager(ProcessManager):
    """SIGTERM to a server's main process only, so it shuts down its own children in order
    (gunicorn its workers, Celery its pool) instead of the whole group dying at once.
    SIGKILL, honcho's last resort after KILL_WAIT seconds, still goes to the whole group."""

    def terminate(self, pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class LocalManager(Manager):
    """honcho's Manager, stopping the broker last: a Celery worker still acknowledges its
    finished tasks while it shuts down, and would log tracebacks if Redis were gone."""

    def __init__(self, printer: Printer, broker: str | None = None):
        super().__init__(printer)
        self._procmgr = LeaderFirstProcessManager()
        self.broker = broker
        self.had_to_kill = False
        self._signalled: set[str] = set()

    def kill(self):
        self.had_to_kill = True
        super().kill()

    def _killall(self, force=False):
        targets = {n: p for n, p in self._processes.items() if "returncode" not in p and p.get("pid")}
        if not force:
            targets = {n: p for n, p in targets.items() if n not in self._signalled}
            if any("returncode" not in p for n, p in self._processes.items() if n != self.broker):
                targets.pop(self.broker, None)
            self._signalled.update(targets)
        for name, p in targets.items():
            self._system_print(f"sending {'SIGKILL' if force else 'SIGTERM'} to {name} (pid {p['pid']})\n")
            if force:
                self._procmgr.kill(p["pid"])
            else:
                self._procmgr.terminate(p["pid"])

    def _all_stopped(self):
        # Manager.loop asks this on every turn. Once stopping, signal what started late,
        # and the broker as soon as it is alone.
        if self._terminating:
            self._killall()
        return super()._all_stopped()

    def say(self, text: str) -> None:
        """Print as "system" through the manager's queue, in order with the children's output."""
        self.events.put(Message(type="line", data=text, time=dt.datetime.now(), name="system", colour=None))

    def say_now(self, text: str) -> None:
        self._system_print(text + "\n")

    def process_ids(self) -> dict[str, int]:
        return {name: p["pid"] for name, p in self._processes.items() if p.get("pid")}

    def return_codes(self) -> dict[str, int | None]:
        return {name: p.get("returncode") for name, p in self._processes.items()}


def port_from_env(name: str) -> int:
    value = os.environ.get(name) or str(environment.declared_default(name))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SystemExit(f"{name}={value!r} is not a port number.")
    return int(value)


def ensure_port_free(port: int, what: str, variable: str) -> None:
    with socket.socket() as sock:
        # As the servers do, so a port that only has connections in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(
                f"Port {port} for {what} is in use on 127.0.0.1 (another `make run`?). "
                f"Stop whatever listens there, or choose another port with {variable}=..."
            ) from None


def command(*argv: str) -> str:
    # honcho runs each command through sh; exec makes the server the process honcho signals.
    return "exec " + shlex.join(argv)


def announce_when_ready(manager: LocalManager, health_url: str, banner: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    last_error = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health_url, timeout=3) as response:  # noqa: S310 (a fixed http URL)
                if response.status == 200:
                    manager.say(banner)
                    return
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}: {exc.read(500).decode(errors='replace')}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.25)
    manager.say(f"{health_url} still not healthy after {READY_TIMEOUT_SECONDS} s: {last_error}")


def main() -> int:
    # The same .env the settings read, so it decides here too (the environment still wins).
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)
    os.environ.setdefault("DJANGO_DEBUG", "true")
    os.environ["PYTHONUNBUFFERED"] = "1"  # children's output reaches the terminal line by line
    var_dir = Path(environment.read("LOCAL_VAR_DIR")).resolve()
    web_port = port_from_env("WEB_PORT")
    flower_port = port_from_env("FLOWER_PORT")
    ensure_port_free(web_port, "the web server", "WEB_PORT")
    ensure_port_free(flower_port, "Flower", "FLOWER_PORT")
    # Each server's Prometheus metrics on its own port: on one host they cannot all use the
    # default 9808 of their own variables, which are set per process below.
    metrics_ports = {
        "web": port_from_env("LOCAL_WEB_METRICS_PORT"),
        "worker": port_from_env("LOCAL_WORKER_METRICS_PORT"),
        "beat": port_from_env("LOCAL_BEAT_METRICS_PORT"),
    }
    for role, port in metrics_ports.items():
        ensure_port_free(port, f"the {role}'s metrics", f"LOCAL_{role.upper()}_METRICS_PORT")

    redis = None
    if not os.environ.get("CELERY_BROKER_URL"):
        redis_port = port_from_env("LOCAL_REDIS_PORT")
        ensure_port_free(redis_port, "the embedded Redis", "LOCAL_REDIS_PORT")
        redis = EmbeddedRedis(port=redis_port, workdir=var_dir / "redis")
        redis.workdir.mkdir(parents=True, exist_ok=True)
        os.environ["CELERY_BROKER_URL"] = f"{redis.url}/0"
        if not os.environ.get("CACHE_URL"):
            os.environ["CACHE_URL"] = f"{redis.url}/1"
    var_dir.mkdir(parents=True, exist_ok=True)
    # The servers' runtime files (metrics, probe files, beat's heartbeat) in this checkout's own
    # directory: under the shared /tmp, another run on the same host would empty its metrics.
    os.environ.setdefault("APP_RUNTIME_DIR", str(var_dir / "runtime"))
    Path(os.environ["APP_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)

    flower_auth = os.environ.get("FLOWER_BASIC_AUTH")
    if flower_auth:
        flower_login = "the user:password in FLOWER_BASIC_AUTH"
    else:
        # A new one each run, so no password sits on disk; set FLOWER_BASIC_AUTH to keep one.
        flower_auth = f"admin:{secrets.token_urlsafe(12)}"
        os.environ["FLOWER_BASIC_AUTH"] = flower_auth  # Flower reads FLOWER_* options itself
        flower_login = f"user admin, password {flower_auth.split(':', 1)[1]}, new each run"

    # Before the servers start, SIGTERM must unwind like Ctrl-C (the Manager takes over later).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        bootstrap = subprocess.run([sys.executable, "manage.py", "bootstrap_local"], cwd=BASE_DIR, check=False)
    except KeyboardInterrupt:
        return 130
    if bootstrap.returncode != 0:
        print(f"manage.py bootstrap_local failed (exit code {bootstrap.returncode}); nothing started.")
        return bootstrap.returncode

    # bootstrap_local ran Django's system checks; Celery need not run them again in each server.
    os.environ.setdefault("CELERY_SKIP_CHECKS", "1")
    python = sys.executable
    # The image's way: Celery's worker and beat commands without the `celery` group's plugins.
    celery_command = (python, "-m", "project.celery_command")
    queues = ",".join([environment.read("CELERY_DEFAULT_QUEUE"), environment.read("CELERY_LONG_QUEUE")])
    manager = LocalManager(Printer(sys.stdout), broker="redis" if redis else None)
    if redis is not None:
        manager.add_process("redis", command(*redis.command()), cwd=BASE_DIR)
    # The image's gunicorn settings and hooks (metrics summed over workers), on loopback only.
    manager.add_process(
        "web",
        command(
            python, "-m", "gunicorn", "-c", "python:project.gunicorn_conf", "project.wsgi",
            "--bind", f"127.0.0.1:{web_port}", "--bind", f"127.0.0.1:{metrics_ports['web']}",
            "--workers", "2", "--worker-tmp-dir", tempfile.gettempdir(), "--no-control-socket",
        ),
        env={**os.environ, "PORT": str(web_port), "WEB_METRICS_PORT": str(metrics_ports["web"])},
        cwd=BASE_DIR,
    )  # fmt: skip
    manager.add_process(
        "worker",
        command(
            *celery_command, "worker", "-Q", queues, "-c", "2", "--without-mingle", "--without-gossip",
            "-E", "-l", "info", "-n", "local@%h",
        ),
        env={**os.environ, "CELERY_METRICS_PORT": str(metrics_ports["worker"])},
        cwd=BASE_DIR,
    )  # fmt: skip
    manager.add_process(
        "beat",
        command(*celery_command, "beat", "-l", "info", "-s", str(var_dir / "celerybeat-schedule")),
        env={**os.environ, "CELERY_METRICS_PORT": str(metrics_ports["beat"])},
        cwd=BASE_DIR,
    )
    manager.add_process(
        "flower",
        command(python, "-m", "project.flower_app", "--address=127.0.0.1", f"--port={flower_port}"),
        cwd=BASE_DIR,
    )

    web = f"http://127.0.0.1:{web_port}"
    manage = f"{os.path.relpath(sys.executable, BASE_DIR)} manage.py"  # pasteable in the checkout
    banner = "\n".join(
        [
            "-" * 72,
            "Ready: the API answers /api/health/ (database, cache, broker and results all reachable).",
            f"  API docs  {web}/api/docs",
            f"  Admin     {web}/admin/   (user admin; its password was printed on the first run only)",
            f"  Flower    http://127.0.0.1:{flower_port}/   ({flower_login})",
            "  Metrics   "
            + "  ".join(f"{role} http://127.0.0.1:{port}/metrics" for role, port in metrics_ports.items()),
            f"  Broker    {os.environ['CELERY_BROKER_URL']}"
            + ("  (embedded Redis, in memory: queued tasks end with the run)" if redis else ""),
            f"  New API token: {manage} create_api_token my-client --owner admin --scope enqueue"
            "   (--scope read|enqueue|manage)",
            f"  New admin password: {manage} changepassword admin",
            "Ctrl-C stops everything.",
            "-" * 72,
        ]
    )
    threading.Thread(
        target=announce_when_ready, args=(manager, f"{web}/api/health/", banner), daemon=True, name="ready"
    ).start()

    manager.loop()
    return finish(manager)


def finish(manager: LocalManager) -> int:
    """Make sure nothing outlives us, and turn the outcome into an exit code (0: stopped on request)."""
    left_behind = []
    for name, pid in manager.process_ids().items():
        try:
            os.killpg(pid, signal.SIGKILL)  # the group is honcho's session for that server
        except ProcessLookupError:
            continue
        left_behind.append(name)
    codes = manager.return_codes()
    if manager.returncode in (130, 143):  # stopped on request: Ctrl-C or SIGTERM
        # A server that had not yet set up its signal handlers simply dies of the SIGTERM.
        unclean = {name: rc for name, rc in codes.items() if rc not in (0, -signal.SIGTERM)}
        if not (unclean or manager.had_to_kill or left_behind):
            manager.say_now("All stopped.")
            return 0
        problems = [
            f"exit codes {unclean}" if unclean else "",
            f"killed: {', '.join(left_behind)}" if left_behind else "",
        ]
        manager.say_now(f"Stopped, not cleanly: {'; '.join(p for p in problems if p) or 'see SIGKILL above'}.")
        return 1
    manager.say_now(f"A process exited on its own, so everything was stopped; exit codes: {codes}.")
    code = manager.returncode
    return code if code and code > 0 else 1  # a negative code means killed by a signal


if __name__ == "__main__":
    sys.exit(main())
