"""A capacity model, measured: the project's full worker scaled from 1 to 8 pool processes on
loopback, with the broker, the result backend, the history recorder and PostgreSQL shared.

The broker and the result backend run as two redis-servers of their own, so each one's CPU is
its own cost; the recorder runs as one process (as in beat). For each scale the queue is filled
with trivial tasks and drained; the run gives tasks per second (worker side) and the CPU each
component spent per task. A single-threaded component (a Redis, the recorder) can give at most
one core: 1 / (its CPU seconds per task) is the rate at which it saturates. Workers scale out.

    python -m tests.benchmarks.capacity --tasks 3000 --plot tests/benchmarks/results/capacity.png
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.benchmarks import harness

# Pool processes -> (worker processes, concurrency of each): the chart's pools run concurrency 2.
SCALES = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (4, 2)}
SHARED = ("broker Redis", "result backend Redis", "history recorder", "PostgreSQL")


@dataclass
class Scale:
    processes: int
    tasks: int
    rate: float
    cpu_ms_per_task: dict[str, float]
    lag_p99: float


def run_scale(processes: int, tasks: int, servers: harness.Servers, database_url: str) -> Scale:
    import redis

    from app.result_backend import HISTORY_STREAM

    broker, results = servers.private_redis(), servers.private_redis()
    harness.truncate_history(database_url)
    env = harness.base_env(database_url, f"{broker.url}/0", servers.workdir, RESULT_BACKEND_URL=f"{results.url}/0")
    instances, concurrency = SCALES[processes]
    recorder = harness.Process(
        [sys.executable, "manage.py", "record_task_history"], env, servers.workdir / f"recorder-{processes}.log"
    )
    workers = [
        harness.Process(
            harness.worker_command("project", concurrency, name=f"w{i}-{processes}@bench"),
            env,
            servers.workdir / f"worker-{processes}-{i}.log",
        )
        for i in range(instances)
    ]
    try:
        for worker in workers:
            harness.wait_ready(worker)
        time.sleep(1)  # start-up work done: from here on, CPU is the tasks'
        pids = {
            "workers": [w.pid for w in workers],
            "broker Redis": [broker.process.pid],
            "result backend Redis": [results.process.pid],
            "history recorder": [recorder.pid],
        }
        before = {name: harness.cpu_seconds(group) for name, group in pids.items()}
        before["PostgreSQL"] = harness.postgres_cpu_seconds()
        harness.fill_queue(f"{broker.url}/0", "app.tasks.add", tasks)
        deadline = time.monotonic() + 600
        while sum(harness.finished_count(w.log()) for w in workers) < tasks:
            if time.monotonic() > deadline or not all(w.alive() for w in workers):
                raise RuntimeError(f"workers stopped early:\n{workers[0].log()[-2000:]}")
            time.sleep(0.2)
        client = redis.Redis.from_url(f"{results.url}/0")
        while client.xlen(HISTORY_STREAM) and time.monotonic() < deadline:
            time.sleep(0.2)
        after = {name: harness.cpu_seconds(group) for name, group in pids.items()}
        after["PostgreSQL"] = harness.postgres_cpu_seconds()
        stamps = harness.done_stamps(f"{results.url}/0")
    finally:
        for process in [*workers, recorder]:
            process.stop()
        for server in (broker, results):
            server.stop()
            servers.started.remove(server)
    lags = _lags(database_url, tasks)
    cpu = {name: 1000 * (after[name] - before[name]) / tasks for name in after}
    return Scale(processes, tasks, harness.rate_between_first_and_last(stamps), cpu, harness.percentile(lags, 0.99))


def _lags(database_url: str, tasks: int) -> list[float]:
    import psycopg

    with psycopg.connect(database_url.replace("postgres://", "postgresql://", 1)) as conn:
        rows = conn.execute("SELECT EXTRACT(EPOCH FROM recorded_at - finished_at) FROM app_tasklog").fetchall()
    if len(rows) != tasks:
        raise RuntimeError(f"the history holds {len(rows)} of {tasks} tasks")
    return [float(lag) for (lag,) in rows]


def measure(servers: harness.Servers, database_url: str, tasks: int) -> list[Scale]:
    return [run_scale(processes, tasks, servers, database_url) for processes in SCALES]


def ceilings(scales: list[Scale]) -> dict[str, float]:
    """Tasks/s at which each shared single-threaded component would need a whole core, from its
    median CPU per task over the runs; PostgreSQL's is per core."""
    return {
        name: 1000 / harness.median([s.cpu_ms_per_task[name] for s in scales])
        for name in SHARED
        if harness.median([s.cpu_ms_per_task[name] for s in scales]) > 0
    }


def report(scales: list[Scale]) -> list[str]:
    names = ["workers", *SHARED]
    lines = [
        f"Capacity: the full worker at 1-8 pool processes, {scales[0].tasks} trivial tasks each; this machine: 2 cores",
        f"  {'pool processes':>14} {'tasks/s':>8} {'history p99':>12}   CPU ms per task: " + ", ".join(names),
    ]
    for s in scales:
        cpu = "  ".join(f"{s.cpu_ms_per_task[name]:6.3f}" for name in names)
        lines.append(f"  {s.processes:>14} {s.rate:>8.0f} {s.lag_p99:>10.2f} s   {cpu}")
    per_process = scales[0].rate
    total_ms = harness.median([sum(s.cpu_ms_per_task.values()) for s in scales])
    lines.append(
        f"  one pool process: {per_process:.0f} tasks/s; every component together: {total_ms:.2f} ms of CPU "
        f"per task, so this 2-core machine tops out near {2000 / total_ms:.0f} tasks/s"
    )
    limits = ceilings(scales)
    first = min(limits, key=limits.get)
    lines.append(
        "  one core saturated at: "
        + ", ".join(f"{name} {rate:,.0f} tasks/s" for name, rate in sorted(limits.items(), key=lambda kv: kv[1]))
        + f"; the first shared component to saturate: {first}"
    )
    return lines


def plot(scales: list[Scale], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = pyplot.subplots(figsize=(10, 4.6), dpi=100)
    xs = [s.processes for s in scales]
    axes.plot(
        xs, [s.rate for s in scales], marker="o", linewidth=2, color="C0", label="measured on this 2-core machine"
    )
    axes.plot(xs, [scales[0].rate * x for x in xs], linestyle=":", color="grey", label="linear in pool processes")
    total_ms = harness.median([sum(s.cpu_ms_per_task.values()) for s in scales])
    axes.axhline(
        2000 / total_ms, color="black", linewidth=1, label=f"this machine's 2 cores full ({2000 / total_ms:,.0f}/s)"
    )
    styles = ("--", "-.", ":", (0, (5, 1)))
    for index, (name, rate) in enumerate(sorted(ceilings(scales).items(), key=lambda kv: kv[1])):
        label = f"{name}: one core full ({rate:,.0f}/s)"
        axes.axhline(rate, linestyle=styles[index % len(styles)], linewidth=1, color=f"C{index + 1}", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(xs, [str(x) for x in xs])
    axes.set_yscale("log")
    axes.set_xlabel("pool processes (worker processes x concurrency)")
    axes.set_ylabel("trivial tasks per second")
    axes.set_title("Full bookkeeping: measured throughput, and where each shared component saturates")
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    with harness.servers() as servers:
        database_url = harness.fresh_database(servers.database_url)
        scales = measure(servers, database_url, args.tasks)
    print("\n".join(report(scales)))
    if args.plot:
        plot(scales, args.plot)


if __name__ == "__main__":
    main()
