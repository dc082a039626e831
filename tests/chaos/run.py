"""make chaos: a bounded chaos run on loopback, on a broker of its own (Redis or RabbitMQ), that
counts every task handed out and says which were lost, run twice, or stuck.

Two workers (concurrency 2, the default pool: the queue `default`, as the chart runs it) take
a mix of tasks published through the API's code path (app/workflows.py: simple tasks, chains,
groups, chords, retries) and tasks that sleep long enough to be caught running, at least once
(`chaos.work`) and at most once (`chaos.work_once`). While they run: SIGKILLs of whole workers
(as a pod dies: the main process and its pool processes) and of single pool processes, a
rolling warm restart, and a broker restart (Redis with AOF, or a RabbitMQ node with durable
queues and persistent messages, shut down and started again on its data). Every run of every
task is written down in a second Redis that is never restarted (tests/apps/chaos_tasks.py); it
also keeps the results. The run follows the worker events and sweeps the at-most-once runs of
dead workers as beat does (app/lost_tasks.py).

    python -m tests.chaos.run [--broker redis|rabbitmq] [--tasks 2000] [--kills 5] [--short-limits]

It prints published / succeeded / failed / lost / duplicated / stuck, and the delays before a
task run again, and exits 1 when an at-least-once task was lost, an at-most-once one ran twice,
or a task that ran was left without a final state.
--short-limits gives the workers short time limits (on Redis, a 10 s visibility timeout), for
the smaller runs in `make test`. The RabbitMQ node needs Debian's rabbitmq-server.
"""

import argparse
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from project.embedded import free_port, redis_server_binary, stop_process, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]

AT_MOST_ONCE = {"chaos.work_once"}
FINAL = {"SUCCESS", "FAILURE", "REVOKED"}
SHORT_LIMITS = {
    "CELERY_TASK_TIME_LIMIT": "4",
    "CELERY_TASK_SOFT_TIME_LIMIT": "3",
    "CELERY_RETRY_BACKOFF_MAX": "1",
    "REDIS_RESTORE_INTERVAL": "1",
    "LOST_TASK_AFTER": "15",
}


class RedisServer:
    """A redis-server of the run's own, on a free loopback port; with AOF, it keeps every
    message across a restart, as a broker with persistence does."""

    def __init__(self, workdir: Path, *, aof: bool):
        self.port, self.workdir, self.aof = free_port(), workdir, aof
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> "RedisServer":
        command = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec",
        ]  # fmt: skip
        log = open(self.workdir / "redis.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=10, process=self.process)
        return self

    def restart(self, down_seconds: float) -> None:
        """SHUTDOWN (the AOF is written and synced), a pause, then the same data again."""
        import redis

        try:
            redis.Redis(port=self.port).shutdown()
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        self.process.wait(timeout=30)
        time.sleep(down_seconds)
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class RabbitMQServer:
    """A RabbitMQ node of the run's own (its own name, ports, data and Erlang cookie), never the
    machine's shared one; its durable queues and persistent messages survive a restart."""

    def __init__(self, workdir: Path):
        self.port, self.dist_port, self.workdir = free_port(), free_port(), workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.workdir / "enabled_plugins").write_text("[].\n")
        self.process: subprocess.Popen | None = None

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> "RabbitMQServer":
        if not RABBITMQ_SERVER.exists():
            raise RuntimeError(f"{RABBITMQ_SERVER} not found: install Debian's rabbitmq-server for a RabbitMQ run")
        env = {
            **os.environ,
            "HOME": str(self.workdir),  # the node's own Erlang cookie
            "RABBITMQ_NODENAME": f"chaos{self.port}@localhost",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
        }
        log = open(self.workdir / "rabbitmq.out", "ab")
        self.process = subprocess.Popen([str(RABBITMQ_SERVER)], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=90, process=self.process)
        return self

    def restart(self, down_seconds: float) -> None:
        """A clean stop (SIGTERM: queues and messages are on disk), a pause, the same node again."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=60)


class Worker:
    """A Celery worker of the default pool, in a process group of its own (a pod)."""

    def __init__(self, name: str, env: dict, workdir: Path):
        self.name, self.hostname = name, f"{name}@chaos"
        command = [
            sys.executable, "-m", "celery", "-A", "tests.apps.chaos_tasks", "worker", "-Q", "default",
            "-c", "2", "-n", self.hostname, "--without-mingle", "--without-gossip", "-E", "-l", "info",
        ]  # fmt: skip
        env = {
            **env,
            "PROMETHEUS_MULTIPROC_BASE_DIR": str(workdir / f"metrics-{name}"),
            "CELERY_WORKER_HEALTH_DIR": str(workdir / f"health-{name}"),
        }
        self.log = open(workdir / f"{name}.log", "ab")
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def pool_processes(self) -> list[int]:
        import psutil

        try:
            return [child.pid for child in psutil.Process(self.process.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL to the whole group, as when a pod's container dies."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def kill_pool_process(self) -> bool:
        pids = self.pool_processes()
        if not pids:
            return False
        os.kill(random.choice(pids), signal.SIGKILL)
        return True

    def warm_stop(self, timeout: float = 120) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Ledger:
    """What the run handed out: task id -> what started it ("chain", "chaos.work_once"...); and
    how many starts the client was refused."""

    names: dict[str, str] = field(default_factory=dict)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ids_and_names: list[tuple[str, str]]) -> None:
        with self.lock:
            self.names.update(ids_and_names)


def worker_env(
    broker_url: str, results_url: str, ledger_server: RedisServer, workdir: Path, short_limits: bool
) -> dict:
    keep = {key: value for key, value in os.environ.items() if not key.startswith(("CELERY_", "DJANGO_", "REDIS"))}
    return {
        **keep,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_SECRET_KEY": "chaos-run-only",
        "DATABASE_URL": f"sqlite:///{workdir / 'chaos.sqlite3'}",
        "CACHE_URL": "locmemcache://",
        "CELERY_BROKER_URL": broker_url,
        "RESULT_BACKEND_URL": results_url,
        "CHAOS_LEDGER_URL": ledger_server.url(0),
        "TASK_HISTORY_RECORDER": "false",
        "WORKER_POOL_NAME": "default",
        "CELERY_METRICS_PORT": "0",
        "CELERY_SKIP_CHECKS": "1",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        **(SHORT_LIMITS if short_limits else {}),
    }


def publish(ledger: Ledger, count: int, seconds: float) -> None:
    """The mix, through the API's code path, until `count` ids are handed out over `seconds`."""
    from celery import current_app
    from kombu.exceptions import OperationalError

    from app import workflows

    # (what it starts, how): every task of the project's canvases is at least once.
    starts = [
        ("simple", lambda i: workflows.start_simple(operation="add", x=i, y=1)),
        ("chain", lambda i: workflows.start_chain(value=i % 7)),
        ("group", lambda i: workflows.start_group(operation="multiply", pairs=[(i, k) for k in range(4)])),
        ("chord", lambda i: workflows.start_chord(chunks=[[i, 1], [2], [3, 4]])),
        ("retry", lambda i: workflows.start_retry(fail_probability=0.0, fail_times=1)),
        ("chaos.work", lambda i: send(current_app, "chaos.work", 0.8)),
        ("chaos.work_once", lambda i: send(current_app, "chaos.work_once", 0.5)),
    ]
    started_at, i = time.monotonic(), 0
    while len(ledger.names) < count:
        i += 1
        label, start = random.choice(starts)
        try:
            started = start(i)
        except OperationalError:
            ledger.refused += 1  # the API answers 503: the client knows it was not queued
            time.sleep(0.2)
            continue
        ledger.add([(task_id, label) for task_id in started.task_ids])
        # An even pace over the run, so the faults land among running and waiting tasks.
        ahead = started_at + seconds * len(ledger.names) / count - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def send(celery_app, name: str, seconds: float):
    from app import workflows

    result = celery_app.send_task(name, args=[seconds], queue="default")
    workflows.record_queued((result.id, name, [seconds], {}))
    return workflows.Started(task_id=result.id, task_ids=[result.id])


def run_faults(workers: list[Worker], broker, env: dict, workdir: Path, seconds: float, kills: int, faults: list, log):
    """Spread over the publishing time: SIGKILLs (whole workers and single pool processes in
    turn), a broker restart, then a rolling warm restart. A killed worker is replaced a second
    later, as Kubernetes starts a new pod. Each fault is appended to `faults` as (time, kind)."""
    generation = {"n": len(workers)}
    started = time.monotonic()

    def fault(kind: str, message: str) -> None:
        faults.append((time.time(), kind))
        log(f"fault: {message}")

    def at(step: int) -> None:
        time.sleep(max(0.0, started + seconds * (step + 1) / (kills + 3) - time.monotonic()))

    def replace(index: int) -> None:
        generation["n"] += 1
        workers[index] = Worker(f"w{generation['n']}", env, workdir)

    for step in range(kills):
        at(step)
        index = step % len(workers)
        if step % 2 == 0:
            fault("worker SIGKILL", f"SIGKILL worker {workers[index].name} (main and pool processes)")
            workers[index].kill()
            time.sleep(1)
            replace(index)
        else:
            fault("pool process SIGKILL", f"SIGKILL a pool process of {workers[index].name}")
            if not workers[index].kill_pool_process():
                log("  (no pool process yet)")
    at(kills)
    if isinstance(broker, RedisServer):
        fault("broker restart", "broker restart (Redis SHUTDOWN, 2 s down, started again on its AOF)")
    else:
        fault("broker restart", "broker restart (RabbitMQ node stopped, 2 s down, started again on its data)")
    broker.restart(down_seconds=2)
    at(kills + 1)
    for index in range(len(workers)):
        fault("warm restart", f"warm restart of {workers[index].name}")
        workers[index].warm_stop()
        replace(index)
        time.sleep(2)


def runs_by_attempt(ledger_url: str) -> dict[tuple[str, int], list[float]]:
    """When each attempt (task id, retries) ran: more than one time is a second run of it."""
    import redis

    runs: dict[tuple[str, int], list[float]] = {}
    for raw in redis.Redis.from_url(ledger_url).lrange("chaos:runs", 0, -1):
        task_id, retries, at, _pid = json.loads(raw)
        runs.setdefault((task_id, retries), []).append(at)
    return runs


def states(task_ids: list[str], backend=None) -> dict[str, dict]:
    """The stored state of each task, in one MGET (the Redis result backend; the current app's
    unless another is given)."""
    from celery import current_app

    backend = backend or current_app.backend
    raws = backend.client.mget([backend.get_key_for_task(task_id) for task_id in task_ids]) if task_ids else []
    return {task_id: backend.decode_result(raw) if raw else {} for task_id, raw in zip(task_ids, raws, strict=True)}


def settle_seconds(celery_app, queues: set[str], *, redis_broker: bool) -> float:
    """How long after the last fault every accepted task must be final. On Redis a message a dead
    or disconnected worker held comes back after its queues' visibility timeout (or, had a worker
    died holding kombu's restore lock, after the lock expires) and a restore sweep; RabbitMQ gives
    a lost consumer's messages back at once. An at-most-once task of a lost worker is failed
    LOST_TASK_AFTER after it was seen running. Then a minute for the runs themselves."""
    from django.conf import settings

    from app import lost_tasks, redelivery, redis_transport

    redelivery_wait = 0.0
    if redis_broker:
        visibility, _task = redelivery.needed_seconds(celery_app, queues)
        lock = redis_transport.Channel.unacked_mutex_expire
        redelivery_wait = max(visibility + redelivery.MARGIN_SECONDS, lock) + 3 * settings.REDIS_RESTORE_INTERVAL
    return max(redelivery_wait, settings.LOST_TASK_AFTER + 3 * lost_tasks.SWEEP_INTERVAL) + 60


def settle(ledger: Ledger, deadline: float, backend=None) -> dict[str, dict]:
    """Waits until every task that ran or was ever stored is final, or the deadline."""
    while True:
        found = states(list(ledger.names), backend)
        open_ids = [
            task_id
            for task_id, meta in found.items()
            if meta.get("status") not in FINAL and (ledger.names[task_id] not in AT_MOST_ONCE or meta)
        ]
        if not open_ids or time.monotonic() > deadline:
            return found
        time.sleep(2)


def report(
    ledger: Ledger, found: dict[str, dict], runs: dict[tuple[str, int], list[float]], faults: list[tuple[float, str]]
) -> tuple[dict, bool]:
    at_least_once = [t for t, name in ledger.names.items() if name not in AT_MOST_ONCE]
    at_most_once = [t for t, name in ledger.names.items() if name in AT_MOST_ONCE]
    status = {t: found[t].get("status", "never stored") for t in ledger.names}
    lost = [t for t in at_least_once if status[t] not in FINAL]
    rerun = {task_id for (task_id, _retries), times in runs.items() if len(times) > 1}
    ran = {task_id for task_id, _retries in runs}
    stuck = [t for t in ledger.names if t in ran and status[t] not in FINAL]
    figures = {
        "published": len(ledger.names),
        "refused (broker down: the API answers 503)": ledger.refused,
        "at least once": len(at_least_once),
        "at most once": len(at_most_once),
        "succeeded": sum(status[t] == "SUCCESS" for t in ledger.names),
        "failed": sum(status[t] == "FAILURE" for t in ledger.names),
        "lost (at least once, not final)": len(lost),
        "stuck (ran, state not final)": len(stuck),
        "run more than once (at least once: allowed)": len(rerun.intersection(at_least_once)),
        "run more than once (at most once: never allowed)": len(rerun.intersection(at_most_once)),
        "at most once, never run or failed": sum(status[t] != "SUCCESS" for t in at_most_once),
        **redelivery_delays(runs, faults),
    }
    failed = [t for t in ledger.names if status[t] == "FAILURE"]
    if failed:
        figures["failed ids (error)"] = [f"{t} {ledger.names[t]} ({error_of(found[t])})" for t in failed[:20]]
    if lost:
        figures["lost ids (state)"] = [f"{t} {ledger.names[t]} ({status[t]})" for t in lost[:20]]
    if stuck:
        figures["stuck ids (state)"] = [f"{t} {ledger.names[t]} ({status[t]})" for t in stuck[:20]]
    passed = not lost and not stuck and not figures["run more than once (at most once: never allowed)"]
    return figures, passed


def redelivery_delays(runs: dict[tuple[str, int], list[float]], faults: list[tuple[float, str]]) -> dict[str, str]:
    """Seconds from a fault to the second run of an attempt that had started before it, by the
    kind of fault (the first one after the first run started: the one that cut it short)."""
    delays: dict[str, list[float]] = {}
    for times in runs.values():
        times = sorted(times)
        for first, again in itertools.pairwise(times):
            between = [(at, kind) for at, kind in faults if first <= at <= again]
            at, kind = min(between) if between else (first, "no fault between the runs")
            delays.setdefault(kind, []).append(again - at)
    return {
        f"run again after a {kind} (s): median / max": f"{statistics.median(d):.1f} / {max(d):.1f} over {len(d)}"
        for kind, d in sorted(delays.items())
    } or {"run again (s)": "none"}


def error_of(meta: dict) -> str:
    result = meta.get("result")
    if isinstance(result, dict) and "exc_type" in result:
        return f"{result['exc_type']}: {result.get('exc_message')}"
    return repr(result)[:200]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis", help="the broker to run on")
    parser.add_argument("--tasks", type=int, default=2000, help="task ids to hand out (canvas members count)")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs: whole workers and pool processes in turn")
    parser.add_argument("--seconds", type=float, default=60, help="publishing time, over which the faults spread")
    parser.add_argument(
        "--short-limits", action="store_true", help="short time limits (Redis: a 10 s visibility timeout)"
    )
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    ledger_server = RedisServer(workdir / "ledger", aof=False).start()
    if args.broker == "redis":  # the results on the broker's Redis, as the project's default has them
        broker = RedisServer(workdir / "broker", aof=True).start()
        broker_url, results_url = broker.url(0), broker.url(1)
    else:  # the results on a Redis that is never restarted
        broker = RabbitMQServer(workdir / "broker").start()
        broker_url, results_url = broker.url(), ledger_server.url(1)
    env = worker_env(broker_url, results_url, ledger_server, workdir, args.short_limits)
    os.environ.update(env)
    import django

    django.setup()
    from django.conf import settings

    from app import redelivery
    from project.celery import app as celery_app

    if args.broker == "redis":
        visibility, _task = redelivery.needed_seconds(celery_app, {"default"})
        log(f"broker and results redis :{broker.port} (AOF), ledger redis :{ledger_server.port}, "
            f"visibility timeout {visibility + redelivery.MARGIN_SECONDS:g} s")  # fmt: skip
    else:
        log(f"broker rabbitmq :{broker.port}, ledger and results redis :{ledger_server.port}")
    # What beat runs: the worker events watcher, failing the at-most-once tasks of a lost worker.
    from app import lost_tasks
    from app.monitoring.cluster_metrics import WorkerEvents, WorkerStates

    watcher = WorkerEvents(
        celery_app,
        WorkerStates(timeout=None, offline_ttl=60),
        lost_runs=lost_tasks.LostRuns(celery_app.backend, lost_after=settings.LOST_TASK_AFTER),
    )
    threading.Thread(target=watcher.run, name="worker-events", daemon=True).start()
    workers = [Worker(f"w{n}", env, workdir) for n in (1, 2)]
    ledger = Ledger()
    faults: list[tuple[float, str]] = []
    try:
        time.sleep(3)
        fault_thread = threading.Thread(
            target=run_faults,
            args=(workers, broker, env, workdir, args.seconds, args.kills, faults, log),
            daemon=True,
        )
        fault_thread.start()
        publish(ledger, args.tasks, args.seconds)
        log(f"published {len(ledger.names)} task ids ({ledger.refused} refused while the broker was down)")
        fault_thread.join()
        found = settle(
            ledger, time.monotonic() + settle_seconds(celery_app, {"default"}, redis_broker=args.broker == "redis")
        )
        log("settled")
        figures, passed = report(ledger, found, runs_by_attempt(ledger_server.url(0)), faults)
    finally:
        for worker in workers:
            worker.warm_stop(timeout=30)
        broker.stop()
        ledger_server.stop()
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"  {name:<{width}}  {value}")
    print(f"  worker logs: {workdir}")
    print("PASSED: nothing lost, nothing stuck, no at-most-once task run twice" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
