"""CPU cost of each exec probe the chart renders, against `celery inspect ping` in the same run.

A real worker (prefork, concurrency 1, the long pool's environment from the chart) runs on an
embedded Redis (or REDIS_URL) with SQLite; each probe command runs as the kubelet would run it,
with the container's environment, and its CPU time (user + system of the child, from
os.wait4) is recorded. The figure to read is the ratio to `inspect ping` in one run.

    make bench            # or: python -m tests.benchmarks.probe_cost --runs 30
"""

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO_ROOT / "deploy" / "image" / "entrypoint.sh"
MAX_SHARE_OF_PING = 0.05


def cpu_and_wall(command: list[str], env: dict) -> tuple[float, float, int]:
    """(CPU seconds of the child and its children, wall seconds, exit code)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - started, process.returncode


def chart_probes(scratch: Path) -> tuple[dict, dict]:
    """The worker container's env (its /tmp moved to scratch) and its exec probes, plus beat's."""
    from tests.deploy.conftest import containers, labels, load_values, of_kind, render_chart
    from tests.deploy.test_chart_invariants import effective_env

    docs = render_chart(load_values("minimal-values.yaml"))
    probes, envs = {}, {}
    for workload in of_kind(docs, "Deployment"):
        role = labels(workload).get("app.kubernetes.io/component")
        pool = labels(workload).get("app.kubernetes.io/worker-pool")
        if role not in ("worker", "beat") or pool not in (None, "long"):
            continue
        container = containers(workload, init=False)[0]
        env = {
            k: (str(scratch) + v[4:] if v.startswith("/tmp/") else v) for k, v in effective_env(docs, container).items()
        }
        envs[role] = env
        for kind in ("livenessProbe", "readinessProbe"):
            command = container[kind]["exec"]["command"]
            probes[f"{role} {kind[: -len('Probe')]}"] = (command, role)
    return probes, envs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each cheap probe")
    parser.add_argument("--ping-runs", type=int, default=5, help="runs of celery inspect ping")
    options = parser.parse_args()

    from project.embedded import EmbeddedRedis

    scratch = Path(tempfile.mkdtemp(prefix="probe-cost-"))
    redis = None if os.environ.get("REDIS_URL") else EmbeddedRedis(workdir=scratch).start()
    redis_url = (os.environ.get("REDIS_URL") or redis.url).rstrip("/")
    probes, envs = chart_probes(scratch)
    overrides = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(scratch),
        "APP_RUNTIME_DIR": str(scratch),
        "DATABASE_URL": f"sqlite:///{scratch / 'db.sqlite3'}",
        "CELERY_BROKER_URL": f"{redis_url}/12",
        "CACHE_URL": "locmemcache://",
        "DJANGO_SECRET_KEY": "benchmark-only",
        "PROMETHEUS_MULTIPROC_BASE_DIR": str(scratch / "prometheus"),
        "CELERY_METRICS_PORT": "0",
        "CELERY_CANARY_STALE_AFTER": "0",  # no beat here: readiness does not await a canary
    }
    worker_env = {**envs["worker"], **overrides}
    beat_env = {**envs["beat"], **overrides}
    Path(beat_env["CELERY_BEAT_HEARTBEAT_FILE"]).touch()  # beat's probe only reads the file's age
    log = open(scratch / "worker.log", "wb")
    worker = subprocess.Popen(
        ["sh", str(ENTRYPOINT), "worker", "--hostname", "bench@probe"],
        env=worker_env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        ready = Path(worker_env["CELERY_WORKER_HEALTH_DIR"]) / "ready"
        deadline = time.monotonic() + 120
        while not ready.exists():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker not ready:\n{(scratch / 'worker.log').read_text()[-2000:]}")
            time.sleep(0.2)

        alive = Path(worker_env["CELERY_WORKER_HEALTH_DIR"]) / "alive"
        candidates = {
            name: (command, worker_env if role == "worker" else beat_env) for name, (command, role) in probes.items()
        }
        # The alternative considered for the file-age check: Python without site-packages.
        python_check = f"import os,sys,time; sys.exit(time.time() - os.stat({str(alive)!r}).st_mtime >= 30)"
        candidates["worker liveness as python -S"] = ([sys.executable, "-S", "-c", python_check], worker_env)
        candidates["celery inspect ping"] = (
            ["celery", "-A", "project", "inspect", "ping", "--timeout", "10", "-d", "bench@probe"],
            worker_env,
        )
        results = {}
        for name, (command, env) in candidates.items():
            runs = options.ping_runs if "inspect ping" in name else options.runs
            samples = [cpu_and_wall(command, env) for _ in range(runs)]
            failed = [code for _, _, code in samples if code != 0]
            if failed:
                raise SystemExit(f"{name} failed ({failed}): {shlex.join(command)}")
            results[name] = (
                statistics.median(cpu for cpu, _, _ in samples),
                statistics.median(wall for _, wall, _ in samples),
            )
        ping_cpu = results["celery inspect ping"][0]
        print(f"\nCPU time per run (user + system of the probe process), median; {options.runs} runs each")
        print(f"{'probe':36} {'CPU ms':>9} {'wall ms':>9} {'CPU vs inspect ping':>20}")
        for name, (cpu, wall) in results.items():
            print(f"{name:36} {cpu * 1000:9.1f} {wall * 1000:9.1f} {cpu / ping_cpu:20.4f}")
        # The chart's probes must stay a small fraction of the probe they replace.
        costly = [name for name in probes if results[name][0] > MAX_SHARE_OF_PING * ping_cpu]
        if costly:
            raise SystemExit(f"more than {MAX_SHARE_OF_PING:.0%} of inspect ping's CPU: {', '.join(costly)}")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
        if redis is not None:
            redis.stop()


if __name__ == "__main__":
    main()
