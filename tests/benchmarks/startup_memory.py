"""Start-up time and idle memory of each role, started through the image's entrypoint
(deploy/image/entrypoint.sh) as Kubernetes starts them.

- worker: from spawn to its "ready." log line (consuming, able to take a task);
- web: from spawn to the first 200 on /api/health/live (gunicorn, 2 workers);
- idle memory: proportional set size (PSS: shared pages split between the processes sharing
  them) of each role's whole process tree, after it has settled: web (master + 2 workers),
  worker (main + 2 pool processes), beat (with the history recorder), flower; measured after a
  warm-up (requests to web, a few tasks to the worker), as they idle in a cluster.

    python -m tests.benchmarks.startup_memory --repeats 3
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from project.embedded import free_port
from tests.benchmarks import harness

ENTRYPOINT = str(harness.REPO_ROOT / "deploy" / "image" / "entrypoint.sh")
SETTLE_SECONDS = 8


def role_env(servers: harness.Servers, database_url: str, **extra) -> dict:
    env = harness.base_env(
        database_url,
        servers.redis(12),
        servers.workdir,
        CACHE_URL=servers.redis(11),
        DJANGO_SETTINGS_MODULE="project.settings",
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        APP_RUNTIME_DIR=servers.workdir,
        GUNICORN_WORKER_TMP_DIR=servers.workdir,
        WEB_CONCURRENCY=2,
        CELERY_WORKER_CONCURRENCY=2,
        FLOWER_BASIC_AUTH="bench:bench",
        FLOWER_ADDRESS="127.0.0.1",
        PATH=f"{Path(harness.runtime_python()).parent}:{os.environ.get('PATH', '')}",
        **extra,
    )
    return env


def start_role(role: str, env: dict, servers: harness.Servers) -> harness.Process:
    return harness.Process(["sh", ENTRYPOINT, role], env, servers.workdir / f"{role}-{time.monotonic_ns()}.log")


def web_first_200(env: dict, servers: harness.Servers) -> tuple[float, harness.Process]:
    web = start_role("web", env, servers)
    return _first_200(web, int(env["PORT"])), web


def _first_200(process: harness.Process, port: int) -> float:
    """Seconds from the process's start to its first 200 on /api/health/live."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health/live", timeout=1) as response:
                if response.status == 200:
                    return time.monotonic() - process.started
        except OSError:
            pass
        if not process.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"no answer on port {port}:\n{process.log()[-2000:]}")
        time.sleep(0.005)


def _warm_up(web_env: dict, worker_env: dict) -> None:
    """Idle after some work, as in a cluster: web requests reach both gunicorn workers (health,
    the schema, a 404), and the worker runs a few tasks."""
    port = int(web_env["PORT"])
    for path in ["/api/health/live", "/api/openapi.json", "/api/task-status/none/"] * 10:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()
        except OSError:
            pass  # the 404 answers with an HTTPError: served all the same
    harness.fill_queue(worker_env["CELERY_BROKER_URL"], "app.tasks.add", 20, queue="default")
    time.sleep(2)


def _bare_django_first_200(servers: harness.Servers, database_url: str) -> tuple[float, harness.Process]:
    port = free_port()
    env = role_env(servers, database_url, PORT=port, WEB_METRICS_PORT=0)
    env["DJANGO_SETTINGS_MODULE"] = "tests.benchmarks.bare_django"
    command = [
        str(Path(harness.runtime_python()).parent / "gunicorn"), "-c", "python:project.gunicorn_conf", "tests.benchmarks.bare_django:application",
        "--bind", f"127.0.0.1:{port}",
    ]  # fmt: skip
    process = harness.Process(command, env, servers.workdir / f"bare-django-{port}.log")
    return _first_200(process, port), process


def web_startup_steps(env: dict) -> dict[str, float]:
    """Seconds per step of loading the web's app (tests/benchmarks/web_startup_steps.py)."""
    run = subprocess.run(
        [harness.runtime_python(), "-m", "tests.benchmarks.web_startup_steps"],
        cwd=harness.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def pss_mb(process: harness.Process) -> float:
    import psutil

    root = psutil.Process(process.pid)
    return sum(member.memory_full_info().pss for member in [root, *root.children(recursive=True)]) / 1e6


def measure(servers: harness.Servers, database_url: str, repeats: int) -> dict:
    startup: dict[str, list[float]] = {"worker": [], "web": [], "stock worker": [], "bare Django web": []}
    steps: dict[str, list[float]] = {}
    for _ in range(repeats):
        for step, seconds in web_startup_steps(role_env(servers, database_url)).items():
            steps.setdefault(step, []).append(seconds)
        worker = start_role("worker", role_env(servers, database_url), servers)
        try:
            startup["worker"].append(harness.wait_ready(worker))
        finally:
            worker.stop()
        seconds, web = web_first_200(
            role_env(servers, database_url, PORT=free_port(), WEB_METRICS_PORT=free_port()), servers
        )
        web.stop()
        startup["web"].append(seconds)
        # The baselines, side by side: stock Celery's worker (no Django) and a bare Django project
        # under the same gunicorn settings.
        env = {key: value for key, value in role_env(servers, database_url).items() if key != "DJANGO_SETTINGS_MODULE"}
        stock = harness.Process(
            harness.worker_command("tests.benchmarks.stock_app", python=harness.runtime_python()),
            env,
            servers.workdir / "stock-start.log",
        )
        try:
            startup["stock worker"].append(harness.wait_ready(stock))
        finally:
            stock.stop()
        seconds, bare = _bare_django_first_200(servers, database_url)
        bare.stop()
        startup["bare Django web"].append(seconds)

    roles = {
        "web": role_env(servers, database_url, PORT=free_port(), WEB_METRICS_PORT=free_port()),
        "worker": role_env(servers, database_url, CELERY_METRICS_PORT=free_port()),
        "beat": role_env(servers, database_url, CELERY_METRICS_PORT=free_port()),
        "flower": role_env(servers, database_url, FLOWER_PORT=free_port()),
    }
    started = {role: start_role(role, env, servers) for role, env in roles.items()}
    try:
        time.sleep(SETTLE_SECONDS)
        for role, process in started.items():
            if not process.alive():
                raise RuntimeError(f"{role} stopped:\n{process.log()[-2000:]}")
        _warm_up(roles["web"], roles["worker"])
        time.sleep(2)
        memory = {role: pss_mb(process) for role, process in started.items()}
    finally:
        for process in started.values():
            process.stop()
    return {
        "startup": startup,
        "steps": steps,
        "memory": memory,
        "runtime": harness.runtime_python() != sys.executable,
    }


def report(result: dict, repeats: int) -> list[str]:
    startup, memory = result["startup"], result["memory"]
    worker, stock = harness.median(startup["worker"]), harness.median(startup["stock worker"])
    web, bare = harness.median(startup["web"]), harness.median(startup["bare Django web"])
    return [
        f"Start-up (median of {repeats}) and idle memory (PSS of each role's process tree), "
        + (
            "with the image's packages alone"
            if result["runtime"]
            else "with the development packages (no .venv/runtime)"
        ),
        f"  worker, spawn to ready:   {worker:.2f} s (stock Celery's worker {stock:.2f} s: {worker / stock:.2f}x)   "
        + "runs: "
        + ", ".join(f"{t:.2f}" for t in startup["worker"]),
        f"  web, spawn to first 200:  {web:.2f} s (a bare Django project {bare:.2f} s: {web / bare:.2f}x)   runs: "
        + ", ".join(f"{t:.2f}" for t in startup["web"]),
        "  web, loading the app in one process (median): "
        + ", ".join(f"{step} {harness.median(times):.2f} s" for step, times in result["steps"].items()),
        "  idle PSS: "
        + ", ".join(f"{role} {mb:.0f} MB" for role, mb in memory.items())
        + f"; all four: {sum(memory.values()):.0f} MB",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with harness.servers() as servers:
        database_url = harness.fresh_database(servers.database_url)
        print("\n".join(report(measure(servers, database_url, args.repeats), args.repeats)))


if __name__ == "__main__":
    main()
