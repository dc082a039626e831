"""Worker throughput on trivial tasks, side by side in one run:

- bare: Celery alone, no result backend, no task events;
- stock: Celery configured like the project (same Redis broker and Redis result backend with
  extended results, task events on, JSON, prefetch 1, acks_late), no Django, no project code;
- unobserved: the project's worker without its Prometheus metrics and structured task logs;
- full: the project's worker as the image runs it.

Every worker is prefork with concurrency 2 and consumes a queue filled beforehand; throughput is
worker side, from the first to the last completion (stored results' date_done; bare Celery's
"succeeded" log lines). After each full run the history
recorder drains what the run stored (it runs in beat, not on the worker's path): its rate is the
history writer's own capacity, and every task must then be in TaskLog. The history's lag while
workers run at full speed is measured by the capacity model (tests/benchmarks/capacity.py).

    python -m tests.benchmarks.worker_throughput --tasks 2000 --repeats 3
"""

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.benchmarks import harness

APPS = {
    "bare": "tests.benchmarks.bare_app",
    "stock": "tests.benchmarks.stock_app",
    "unobserved": "tests.benchmarks.unobserved_app",
    "full": "project",
}
LABELS = {
    "bare": "bare Celery (no results, no events)",
    "stock": "stock Celery configured like the project",
    "unobserved": "project worker without metrics and JSON logs",
    "full": "project worker, full",
}


@dataclass
class Throughput:
    runs: dict[str, list[float]] = field(default_factory=lambda: {mode: [] for mode in APPS})
    drains: list[float] = field(default_factory=list)  # tasks/s the recorder wrote to TaskLog

    def median(self, mode: str) -> float:
        return harness.median(self.runs[mode])


def run_mode(mode: str, tasks: int, env: dict, workdir: Path, database_url: str, result: Throughput) -> None:
    import redis

    broker_url = env["CELERY_BROKER_URL"]
    redis.Redis.from_url(broker_url).flushdb()
    harness.truncate_history(database_url)
    name = "bench.add" if mode in ("bare", "stock") else "app.tasks.add"
    harness.fill_queue(broker_url, name, tasks)
    if mode in ("bare", "stock"):
        # Without Django in its environment Celery applies no Django fixup and runs no app code.
        env = {key: value for key, value in env.items() if key != "DJANGO_SETTINGS_MODULE"}
    worker = harness.Process(harness.worker_command(APPS[mode]), env, workdir / f"{mode}-{time.monotonic_ns()}.log")
    deadline = time.monotonic() + 300
    try:
        while _finished(mode, worker, broker_url) < tasks:
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{mode} worker stopped early:\n{worker.log()[-2000:]}")
            time.sleep(0.2)
    finally:
        worker.stop()
    # Worker-side completion times: the stored results' (bare Celery stores none: its log lines).
    stamps = harness.succeeded_stamps(worker.log()) if mode == "bare" else harness.done_stamps(broker_url)
    if len(stamps) != tasks:
        raise RuntimeError(f"{mode}: {len(stamps)} completion times for {tasks} tasks")
    result.runs[mode].append(harness.rate_between_first_and_last(stamps))
    if mode == "full":
        result.drains.append(_drain_history(env, workdir, database_url, tasks))


def _finished(mode: str, worker: harness.Process, broker_url: str) -> int:
    """Tasks done so far: Celery's log lines (bare, stock), else the states stored in the history
    stream (one per trivial task; the project's workers log no per-task line without JSON logs)."""
    if mode in ("bare", "stock"):
        return harness.finished_count(worker.log())
    import redis

    from app.result_backend import HISTORY_STREAM

    return redis.Redis.from_url(broker_url).xlen(HISTORY_STREAM)


def _drain_history(env: dict, workdir: Path, database_url: str, tasks: int) -> float:
    """The recorder started on the full run's backlog: tasks written to TaskLog per second, once
    every one of them is there (the completeness check)."""
    import psycopg
    import redis

    from app.result_backend import HISTORY_STREAM

    client = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    recorder = harness.Process(
        [sys.executable, "manage.py", "record_task_history"], env, workdir / f"recorder-{time.monotonic_ns()}.log"
    )
    try:
        deadline = time.monotonic() + 300
        while "Recording task history" not in recorder.log():
            if not recorder.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the recorder did not start:\n{recorder.log()[-2000:]}")
            time.sleep(0.01)
        started = time.monotonic()
        while client.xlen(HISTORY_STREAM):
            if time.monotonic() > deadline:
                raise RuntimeError("the recorder did not drain the history stream")
            time.sleep(0.02)
        seconds = time.monotonic() - started
    finally:
        recorder.stop()
    with psycopg.connect(database_url.replace("postgres://", "postgresql://", 1)) as conn:
        (recorded,) = conn.execute("SELECT count(*) FROM app_tasklog WHERE state = 'SUCCESS'").fetchone()
    if recorded != tasks:
        raise RuntimeError(f"the history holds {recorded} of {tasks} finished tasks")
    return tasks / seconds


def measure(servers: harness.Servers, database_url: str, tasks: int, repeats: int) -> Throughput:
    env = harness.base_env(database_url, servers.redis(12), servers.workdir)
    result = Throughput()
    for _ in range(repeats):
        for mode in APPS:
            run_mode(mode, tasks, env, servers.workdir, database_url, result)
    return result


def report(result: Throughput, tasks: int, repeats: int) -> list[str]:
    bare, stock = result.median("bare"), result.median("stock")
    lines = [
        f"Worker throughput: {tasks} trivial tasks, prefork concurrency 2, Redis broker; median of {repeats}",
        f"  {'setup':<52} {'tasks/s':>8} {'vs stock':>9} {'vs bare':>8}   runs",
    ]
    for mode, label in LABELS.items():
        median = result.median(mode)
        runs = ", ".join(f"{r:.0f}" for r in result.runs[mode])
        lines.append(f"  {label:<52} {median:>8.0f} {median / stock:>9.2f} {median / bare:>8.2f}   {runs}")
    full, unobserved = result.median("full"), result.median("unobserved")
    lines.append(f"  full vs the same worker without metrics and JSON logs: {full / unobserved:.2f}x")
    if result.drains:
        lines.append(
            f"  history recorder, draining each full run's {tasks} states: {harness.median(result.drains):.0f} "
            f"tasks/s into TaskLog (runs: {', '.join(f'{d:.0f}' for d in result.drains)}); every task recorded"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with harness.servers() as servers:
        database_url = harness.fresh_database(servers.database_url)
        result = measure(servers, database_url, args.tasks, args.repeats)
    print("\n".join(report(result, args.tasks, args.repeats)))


if __name__ == "__main__":
    main()
