"""`python -m project.localrun` (what `make run` starts): the whole system from nothing but Python."""

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from app import selectors
from tests.resources import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


class Output:
    """Collects a child's output on a thread, so its pipe never fills up."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def tail(self, count: int = 80) -> str:
        return "".join(self.lines[-count:])

    def wait_for(self, pattern: str, *, process: subprocess.Popen, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text)
            if match:
                return match
            assert process.poll() is None, f"localrun exited with {process.returncode}:\n{self.tail()}"
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the output after {timeout} s:\n{self.tail()}")


def http(url: str, *, body: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for_status(url: str, status: int, *, process: subprocess.Popen, output: Output, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert process.poll() is None, f"localrun exited with {process.returncode}:\n{output.tail()}"
        try:
            last = http(url)
            if last[0] == status:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered {status} (last: {last!r}):\n{output.tail()}")


def leftovers(started: dict[int, float], directory: str, ports: list[int]) -> list[str]:
    """Processes we saw started that are still alive, and any whose command line names our run."""
    found = []
    for pid, create_time in started.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{pid} {' '.join(proc.cmdline())}")
        except psutil.NoSuchProcess:
            pass
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["pid"] == os.getpid():
            continue
        if directory in cmdline or any(re.search(rf"(?<!\d){port}(?!\d)", cmdline) for port in ports):
            found.append(f"{proc.info['pid']} {cmdline}")
    return sorted(set(found))


def bootstrap_output() -> str:
    out = io.StringIO()
    call_command("bootstrap_local", verbosity=0, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_bootstrap_local_creates_the_admin_and_a_token_once_and_keeps_only_hashes():
    first = bootstrap_output()
    password = re.search(r"Admin password\s+(\S+)", first).group(1)
    token = re.search(r"API token\s+(\S+)", first).group(1)
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser
    assert admin.check_password(password)
    assert password not in admin.password
    grant = selectors.api_token_grant(secret=token)
    assert (grant.name, grant.scope, grant.owner_id) == ("local", "manage", admin.pk)

    second = bootstrap_output()
    # The hint is a command to paste: this interpreter, manage.py, and arguments the command takes.
    hint = re.search(r"A new API token: (.+)", second).group(1).split()
    assert hint[:3] == [os.path.relpath(sys.executable), "manage.py", "create_api_token"]
    out = io.StringIO()
    call_command(*hint[2:], stdout=out)
    assert selectors.api_token_grant(secret=out.getvalue().strip()).scope == "enqueue"
    assert password not in second
    assert token not in second
    assert get_user_model().objects.filter(username="admin").count() == 1


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_localrun_serves_runs_a_task_and_stops_cleanly_on_ctrl_c(tmp_path):
    web_port, flower_port, redis_port = free_port(), free_port(), free_port()
    metrics_ports = {"web": free_port(), "worker": free_port(), "beat": free_port()}
    assert len({web_port, flower_port, redis_port, *metrics_ports.values()}) == 6
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "LOCAL_VAR_DIR": str(tmp_path / "var"),
        "WEB_PORT": str(web_port),
        "FLOWER_PORT": str(flower_port),
        "LOCAL_REDIS_PORT": str(redis_port),
        **{f"LOCAL_{role.upper()}_METRICS_PORT": str(port) for role, port in metrics_ports.items()},
        # Empty counts as unset for localrun, and keeps a developer's .env out of the test.
        "CELERY_BROKER_URL": "",
        "CACHE_URL": "",
    }
    # Without the suite's APP_RUNTIME_DIR, make run keeps its runtime files in LOCAL_VAR_DIR/runtime.
    for name in ("DJANGO_DEBUG", "FLOWER_BASIC_AUTH", "APP_RUNTIME_DIR"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "project.localrun"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(process.stdout)
    started: dict[int, float] = {}
    web = f"http://127.0.0.1:{web_port}"
    try:
        wait_for_status(f"{web}/api/health/", 200, process=process, output=output, timeout=90)
        token = output.wait_for(r"API token\s+(\S+)", process=process, timeout=5).group(1)
        flower_password = output.wait_for(r"password (\S+), new each run", process=process, timeout=10).group(1)
        for child in psutil.Process(process.pid).children(recursive=True):
            started[child.pid] = child.create_time()

        status, body = http(
            f"{web}/api/simple-task/", body={"x": 2, "y": 3}, headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 202, body
        task_id = json.loads(body)["task_id"]
        deadline = time.monotonic() + 30
        while True:
            status, body = http(f"{web}/api/task-status/{task_id}/", headers={"Authorization": f"Bearer {token}"})
            task = json.loads(body)
            if task["state"] == "SUCCESS" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (task["state"], task["result"]) == ("SUCCESS", 5), f"{task}\n{output.tail()}"

        flower = f"http://127.0.0.1:{flower_port}/"
        credentials = base64.b64encode(f"admin:{flower_password}".encode()).decode()
        assert http(flower, headers={"Authorization": f"Basic {credentials}"})[0] == 200
        assert http(flower)[0] == 401

        # Each server's metrics on its own port; the web's only on its metrics listener.
        for role, metric in (
            ("web", b"django_http_requests_total_by_method_total"),
            ("worker", b"celery_task_succeeded_total"),
            ("beat", b"django_celery_k8s_beat_last_tick_timestamp_seconds"),
        ):
            status, body = http(f"http://127.0.0.1:{metrics_ports[role]}/metrics")
            assert (status, metric in body) == (200, True), f"{role}: {body[:300]}"
        assert http(f"{web}/metrics")[0] == 404

        for child in psutil.Process(process.pid).children(recursive=True):
            started[child.pid] = child.create_time()
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=30)
        assert returncode == 0, output.tail()
        time.sleep(0.5)  # let the kernel reap what just exited
        assert leftovers(started, str(tmp_path), [web_port, flower_port, redis_port, *metrics_ports.values()]) == [], (
            output.tail()
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid, create_time in started.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == create_time:
                    proc.kill()
            except psutil.NoSuchProcess:
                pass
