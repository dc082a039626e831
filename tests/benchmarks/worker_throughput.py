"""Worker throughput on trivial tasks, side by side in one run:

- bare: Celery alone, no result backend, no task events;
- stock: Celery configured like the project (same Redis broker and Redis result backend with
  extended results, task events on, JSON, prefetch 1, acks_late), no Django, no project code;
- unobserved: the project's worker without its Prometheus metrics and structured task logs;
- full: the project's worker as the image runs it (Redis broker, Redis results);
- full, STARTED stored for every task (CELERY_TASK_TRACK_STARTED=true; by default only the long
  queue's tasks store it);
- full, database results: the same with RESULT_BACKEND_URL=django-db;
- full, traced: OpenTelemetry on (project/tracing.py), every task sampled, and one in ten,
  exporting to an OTLP endpoint that throws the spans away (harness.otlp_sink);
- with RABBITMQ_URL set, the full worker on RabbitMQ with Redis results and with database
  results: the two choices of a RabbitMQ deployment; and on classic queues instead of quorum
  queues (RABBITMQ_QUEUE_TYPE).

Every worker is prefork with concurrency 2 and consumes a queue filled beforehand; throughput is
worker side, from the first to the last completion (stored results' date_done; bare Celery's
"succeeded" log lines). After each full run the history recorder drains what the run stored (it
runs in beat, not on the worker's path): its rate is the history writer's own capacity, and every
task must then be in TaskLog. The history's lag while workers run at full speed is measured by
the capacity model (tests/benchmarks/capacity.py).

    python -m tests.benchmarks.worker_throughput --tasks 2000 --repeats 3
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from app import rabbitmq_queues
from tests.benchmarks import harness


@dataclass(frozen=True)
class Mode:
    label: str
    app: str
    broker: str = "redis"  # or "amqp"
    results: str | None = "redis"  # "redis", "django-db" or None
    env: tuple = ()  # more settings, (name, value) pairs
    traced: bool = False  # OpenTelemetry on, exporting to the run's OTLP sink

    @property
    def project(self) -> bool:
        return not self.app.startswith(("tests.benchmarks.bare_app", "tests.benchmarks.stock_app"))


MODES = {
    "bare": Mode("bare Celery (no results, no events)", "tests.benchmarks.bare_app", results=None),
    "stock": Mode("stock Celery configured like the project", "tests.benchmarks.stock_app"),
    "unobserved": Mode("project worker without metrics and JSON logs", "tests.benchmarks.unobserved_app"),
    "full": Mode("project worker, full", "project"),
    "full-started": Mode(
        "project worker, STARTED stored for every task", "project", env=(("CELERY_TASK_TRACK_STARTED", "true"),)
    ),
    "full-db": Mode("project worker, database results", "project", results="django-db"),
    "full-traced": Mode(
        "project worker, traced, every task sampled",
        "project",
        traced=True,
        env=(("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "1.0")),
    ),
    "full-traced-10": Mode(
        "project worker, traced, one task in ten sampled",
        "project",
        traced=True,
        env=(("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.1")),
    ),
    "amqp-redis": Mode("project worker on RabbitMQ, Redis results", "project", broker="amqp"),
    "amqp-classic": Mode(
        "the same on classic queues", "project", broker="amqp", env=(("RABBITMQ_QUEUE_TYPE", "classic"),)
    ),
    "amqp-db": Mode("project worker on RabbitMQ, database results", "project", broker="amqp", results="django-db"),
}


@dataclass
class Throughput:
    modes: list[str]
    runs: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)  # the worker's CPU per task
    drains: list[float] = field(default_factory=list)  # tasks/s the recorder wrote to TaskLog

    def median(self, mode: str) -> float:
        return harness.median(self.runs[mode])

    def ratio(self, mode: str, to: str) -> float:
        """The median of the per-round ratios: rounds are interleaved, so a burst of noise on the
        machine moves both sides of one round alike."""
        return harness.median([a / b for a, b in zip(self.runs[mode], self.runs[to], strict=True)])

    def cpu(self, mode: str) -> float:
        return harness.median(self.cpu_ms[mode])


def run_mode(name: str, tasks: int, env: dict, workdir: Path, database_url: str, result: Throughput) -> None:
    import redis

    mode = MODES[name]
    redis_url = env["CELERY_BROKER_URL"]
    redis.Redis.from_url(redis_url).flushdb()
    harness.truncate_history(database_url)
    broker_url = os.environ["RABBITMQ_URL"] if mode.broker == "amqp" else redis_url
    sink = env.pop(OTLP_SINK_VARIABLE)
    env = {**env, "CELERY_BROKER_URL": broker_url, **dict(mode.env)}
    if mode.traced:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink
    if mode.project:
        env["RESULT_BACKEND_URL"] = "django-db" if mode.results == "django-db" else redis_url
    else:
        # Without Django in its environment Celery applies no Django fixup and runs no app code.
        env = {key: value for key, value in env.items() if key != "DJANGO_SETTINGS_MODULE"}
    publisher_conf = {}
    if mode.broker == "amqp":
        # The queue as the project declares every pool's queue on RabbitMQ (a quorum queue with
        # a delivery limit, app/rabbitmq_queues.py), created afresh.
        harness.delete_queue(broker_url)
        env["CELERY_CANARY_QUEUES"] = harness.QUEUE
        queue_type = dict(mode.env).get("RABBITMQ_QUEUE_TYPE", "quorum")
        publisher_conf = rabbitmq_queues.celery_settings([harness.QUEUE], queue_type=queue_type, delivery_limit=20)
    harness.fill_queue(broker_url, "app.tasks.add" if mode.project else "bench.add", tasks, **publisher_conf)
    worker = harness.Process(harness.worker_command(mode.app), env, workdir / f"{name}-{time.monotonic_ns()}.log")
    deadline = time.monotonic() + 300
    try:
        harness.wait_ready(worker)
        cpu_at_start = harness.cpu_seconds([worker.pid])  # its imports and start-up are not the tasks'
        while _finished(mode, worker, redis_url, database_url) < tasks:
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{name} worker stopped early:\n{worker.log()[-2000:]}")
            time.sleep(0.2)
        result.cpu_ms.setdefault(name, []).append(1000 * (harness.cpu_seconds([worker.pid]) - cpu_at_start) / tasks)
    finally:
        worker.stop()
    # Worker-side completion times: the stored results' (bare Celery stores none: its log lines).
    if mode.results is None:
        stamps = harness.succeeded_stamps(worker.log())
    elif mode.results == "django-db":
        stamps = harness.database_done_stamps(database_url)
    else:
        stamps = harness.done_stamps(redis_url)
    if len(stamps) != tasks:
        raise RuntimeError(f"{name}: {len(stamps)} completion times for {tasks} tasks")
    result.runs.setdefault(name, []).append(harness.rate_between_first_and_last(stamps))
    if name == "full":
        result.drains.append(_drain_history(env, workdir, database_url, tasks))
    elif mode.results == "django-db" and harness.history_rows(database_url) != tasks:
        raise RuntimeError(f"{name}: the database backend did not write every task to TaskLog")


def _finished(mode: Mode, worker: harness.Process, redis_url: str, database_url: str) -> int:
    """Tasks done so far: Celery's log lines (bare, stock), else the stored states: the history
    stream's entries (one per trivial task) or the database's rows."""
    if not mode.project:
        return harness.finished_count(worker.log())
    if mode.results == "django-db":
        return harness.history_rows(database_url)
    import redis

    from app.result_backend import HISTORY_STREAM

    # With STARTED stored too, two entries per task.
    per_task = 2 if dict(mode.env).get("CELERY_TASK_TRACK_STARTED") == "true" else 1
    return redis.Redis.from_url(redis_url).xlen(HISTORY_STREAM) // per_task


def _drain_history(env: dict, workdir: Path, database_url: str, tasks: int) -> float:
    """The recorder started on the full run's backlog: tasks written to TaskLog per second, once
    every one of them is there (the completeness check)."""
    import redis

    from app.result_backend import HISTORY_STREAM

    client = redis.Redis.from_url(env["RESULT_BACKEND_URL"])
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
    recorded = harness.history_rows(database_url)
    if recorded != tasks:
        raise RuntimeError(f"the history holds {recorded} of {tasks} finished tasks")
    return tasks / seconds


def modes_here() -> list[str]:
    """Every mode; the RabbitMQ ones only where RABBITMQ_URL names a broker."""
    return [name for name, mode in MODES.items() if mode.broker != "amqp" or os.environ.get("RABBITMQ_URL")]


OTLP_SINK_VARIABLE = "BENCH_OTLP_SINK"  # the sink's URL, handed to run_mode beside the environment


def measure(servers: harness.Servers, database_url: str, tasks: int, repeats: int) -> Throughput:
    env = harness.base_env(database_url, servers.redis(12), servers.workdir)
    result = Throughput(modes=modes_here())
    with harness.otlp_sink() as sink:
        for _ in range(repeats):
            for name in result.modes:
                run_mode(name, tasks, {**env, OTLP_SINK_VARIABLE: sink}, servers.workdir, database_url, result)
    return result


def report(result: Throughput, tasks: int, repeats: int) -> list[str]:
    lines = [
        f"Worker throughput: {tasks} trivial tasks, prefork concurrency 2; {repeats} interleaved rounds",
        "  tasks/s: median of the rounds; ratios: median of the per-round ratios; CPU: the worker's",
        "  processes (main and pool), milliseconds per task",
        f"  {'setup':<52} {'tasks/s':>8} {'vs stock':>9} {'vs bare':>8} {'CPU ms':>7}   runs",
    ]
    for name in result.modes:
        runs = ", ".join(f"{r:.0f}" for r in result.runs[name])
        lines.append(
            f"  {MODES[name].label:<52} {result.median(name):>8.0f} {result.ratio(name, 'stock'):>9.2f} "
            f"{result.ratio(name, 'bare'):>8.2f} {result.cpu(name):>7.2f}   {runs}"
        )
    lines.append(
        f"  full vs the same worker without metrics and JSON logs: {result.ratio('full', 'unobserved'):.2f}x "
        f"(CPU per task {result.cpu('full') / result.cpu('unobserved'):.2f}x)"
    )
    lines.append(f"  full vs stock Celery, CPU per task: {result.cpu('full') / result.cpu('stock'):.2f}x")
    lines.append(
        f"  STARTED stored for every task vs not (the default): {result.ratio('full-started', 'full'):.2f}x "
        f"(CPU per task {result.cpu('full-started') / result.cpu('full'):.2f}x)"
    )
    lines.append(f"  database results vs Redis results, same worker: {result.ratio('full-db', 'full'):.2f}x")
    for name, share in (("full-traced", "every task"), ("full-traced-10", "one task in ten")):
        lines.append(
            f"  traced ({share} sampled) vs not traced: {result.ratio(name, 'full'):.2f}x "
            f"(CPU per task {result.cpu(name) / result.cpu('full'):.2f}x)"
        )
    if "amqp-db" in result.runs:
        lines.append(f"  on RabbitMQ, database results vs Redis results: {result.ratio('amqp-db', 'amqp-redis'):.2f}x")
        lines.append(
            f"  on RabbitMQ, quorum queues vs classic queues: {result.ratio('amqp-redis', 'amqp-classic'):.2f}x "
            f"(CPU per task {result.cpu('amqp-redis') / result.cpu('amqp-classic'):.2f}x)"
        )
    else:
        lines.append("  (RabbitMQ modes skipped: no RABBITMQ_URL)")
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
