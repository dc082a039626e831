"""Worker throughput on trivial tasks: bare Celery, this project's bookkeeping without its
observability (TaskLog written by signal handlers + the database result backend), and the full
worker (the same plus Prometheus metrics and structured JSON task logs): the last ratio is what
metrics and logging cost.

Both workers are prefork with concurrency 2 on the same Redis; modes are interleaved and
repeated, and the figure to read is the ratio in one run (these machines are noisy).
Throughput is worker-side: tasks between the first and the last "succeeded" log line.

    make bench            # uses DATABASE_URL / REDIS_URL if set, embedded servers otherwise
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
QUEUE = "bench"
SUCCEEDED = " succeeded in "
# Celery's plain format ("[2026-11-25 01:02:03,456: INFO/...") or structlog's ISO timestamps.
TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)[,.](\d{3})")
APPS = {"bare": "tests.benchmarks.bare_app", "stock": "tests.benchmarks.stock_app", "unobserved": "tests.benchmarks.unobserved_app", "full": "project"}
LABELS = {
    "stock": "stock",
    "bare": "bare Celery, no result backend",
    "unobserved": "TaskLog + database results",
    "full": "the same + metrics + JSON task logs",
}


def worker_command(app: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", app, "worker", "-Q", QUEUE, "-c", "2", "--pool", "prefork",
        "--without-mingle", "--without-gossip", "-l", "info",
    ]  # fmt: skip


def run_mode(mode: str, tasks: int, env: dict, workdir: Path) -> float:
    """Fill the queue, start a worker, wait for every task, return tasks per second."""
    from celery import Celery

    publisher = Celery(broker=env["CELERY_BROKER_URL"])
    name = "bench.add" if mode in ("bare", "stock") else "app.tasks.add"
    with publisher.producer_or_acquire() as producer:
        for i in range(tasks):
            publisher.send_task(name, args=[i, 1], queue=QUEUE, producer=producer)

    log_path = workdir / f"{mode}-{time.monotonic_ns()}.log"
    app = APPS[mode]
    env = {**env, "LOG_FORMAT": "json" if mode == "full" else "console"}
    if mode in ("bare", "stock"):
        # Without Django in its environment Celery applies no Django fixup and runs no app code.
        env = {key: value for key, value in env.items() if key != "DJANGO_SETTINGS_MODULE"}
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            worker_command(app), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        try:
            while log_path.read_text(errors="replace").count(SUCCEEDED) < tasks:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{mode} worker stopped early:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.2)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
    stamps = [
        datetime.strptime(" ".join(TIMESTAMP.search(line).groups()), "%Y-%m-%d %H:%M:%S %f")
        for line in log_path.read_text().splitlines()
        if SUCCEEDED in line
    ]
    return (len(stamps) - 1) / (max(stamps) - min(stamps)).total_seconds()


def prepare_database(database_url: str) -> str:
    """A dedicated, migrated database next to the given one."""
    import psycopg

    parts = urlsplit(database_url)
    admin = psycopg.connect(
        host=parts.hostname or dict(p.split("=") for p in parts.query.split("&") if p).get("host"),
        port=parts.port or 5432,
        user=parts.username or "postgres",
        dbname=parts.path.lstrip("/") or "postgres",
        autocommit=True,
    )
    admin.execute("DROP DATABASE IF EXISTS celery_bench")
    admin.execute("CREATE DATABASE celery_bench")
    admin.close()
    return urlunsplit(parts._replace(path="/celery_bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from project.embedded import EmbeddedPostgres, EmbeddedRedis

    workdir = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    started = []
    try:
        if not os.environ.get("DATABASE_URL"):
            started.append(EmbeddedPostgres(workdir / "pg" / "data").start())
            os.environ["DATABASE_URL"] = started[-1].url
        if not os.environ.get("REDIS_URL"):
            started.append(EmbeddedRedis(workdir=workdir).start())
            os.environ["REDIS_URL"] = started[-1].url
        env = {
            **os.environ,
            "DATABASE_URL": prepare_database(os.environ["DATABASE_URL"]),
            "CELERY_BROKER_URL": os.environ["REDIS_URL"].rstrip("/") + "/12",
            "DJANGO_SECRET_KEY": "bench",
            "DJANGO_DEBUG": "false",
            "PYTHONPATH": str(REPO_ROOT),
            "CELERY_METRICS_PORT": "0",  # the per-task cost is in the handlers, not the idle server
            "PROMETHEUS_MULTIPROC_BASE_DIR": str(workdir / "prometheus"),
        }
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO_ROOT, env=env, check=True)

        results: dict[str, list[float]] = {mode: [] for mode in APPS}
        for _ in range(args.repeats):
            for mode in results:
                results[mode].append(run_mode(mode, args.tasks, env, workdir))
        bare = statistics.median(results["bare"])
        print(f"\n{args.tasks} trivial tasks, prefork concurrency 2, Redis broker; median of {args.repeats}")
        print(f"{'setup':<52} {'tasks/s':>8} {'vs bare':>8}")
        for mode, label in LABELS.items():
            median = statistics.median(results[mode])
            runs = ", ".join(f"{r:.0f}" for r in results[mode])
            print(f"{label:<52} {median:>8.0f} {median / bare:>8.2f}   runs: {runs}")
        observed = statistics.median(results["full"]) / statistics.median(results["unobserved"])
        print(f"metrics + structured logging: {observed:.2f}x the throughput of the same worker without them")
    finally:
        for server in reversed(started):
            server.stop()


if __name__ == "__main__":
    main()
