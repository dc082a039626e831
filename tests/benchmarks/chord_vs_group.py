"""A chord of 1,000 against a group of 1,000, with the project's default configuration (Redis
result backend), on the project's worker (prefork, concurrency 2).

Both are the project's own chord pattern: process_data_chunk for each part, and for the chord
aggregate_results once every part is in. Each is published first, then a worker started on it,
and timed worker side: from the first part's start to the last stored result (the group's last
part, or the chord's callback). The difference is what counting the parts and joining them costs.

    python -m tests.benchmarks.chord_vs_group --size 1000 --repeats 3
"""

import argparse
import datetime as dt
import json
import subprocess
import sys
import time

from tests.benchmarks import harness

# Run in a child with the project's settings: a chord is counted from the publisher's side too.
PUBLISH = """
import json, sys, django
django.setup()
from celery import chord, group
from app import tasks
kind, size, queue = sys.argv[1], int(sys.argv[2]), sys.argv[3]
parts = [tasks.process_data_chunk.s(i, [float(i)]).set(queue=queue) for i in range(size)]
if kind == "group":
    result = group(parts).apply_async()
    print(json.dumps({"parts": [r.id for r in result.results], "last": None}))
else:
    result = chord(parts)(tasks.aggregate_results.s().set(queue=queue))
    print(json.dumps({"parts": [r.id for r in result.parent.results], "last": result.id}))
"""


def _meta(client, task_id: str) -> dict | None:
    raw = client.get(f"celery-task-meta-{task_id}")
    return json.loads(raw) if raw else None


def run_once(kind: str, size: int, env: dict, workdir) -> float:
    """Publish a group or a chord, then start a worker on it: seconds from the first part's start
    to the last result stored (worker side, so the publisher's time is not in it)."""
    import redis

    client = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    client.flushdb()
    published = subprocess.run(
        [sys.executable, "-c", PUBLISH, kind, str(size), harness.QUEUE],
        cwd=harness.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    ids = json.loads(published.stdout.strip().splitlines()[-1])
    waited_for = [ids["last"]] if ids["last"] else ids["parts"]
    worker = harness.Process(
        harness.worker_command("project"), env, workdir / f"chord-{kind}-{time.monotonic_ns()}.log"
    )
    try:
        deadline = time.monotonic() + 300
        while not all((meta := _meta(client, task_id)) and meta["status"] == "SUCCESS" for task_id in waited_for):
            if time.monotonic() > deadline or not worker.alive():
                raise RuntimeError(f"{kind} of {size} did not finish:\n{worker.log()[-2000:]}")
            time.sleep(0.1)
    finally:
        worker.stop()
    if ids["last"] and _meta(client, ids["last"])["result"]["chunks"] != size:
        raise RuntimeError(f"the chord's callback saw {_meta(client, ids['last'])['result']['chunks']} of {size} parts")
    first = min(dt.datetime.fromisoformat(_meta(client, task_id)["date_started"]) for task_id in ids["parts"])
    last = max(dt.datetime.fromisoformat(_meta(client, task_id)["date_done"]) for task_id in waited_for)
    return (last - first).total_seconds()


def measure(servers: harness.Servers, database_url: str, size: int, repeats: int) -> dict[str, list[float]]:
    env = harness.base_env(database_url, servers.redis(12), servers.workdir, DJANGO_SETTINGS_MODULE="project.settings")
    times: dict[str, list[float]] = {"group": [], "chord": []}
    for _ in range(repeats):
        for kind in times:
            times[kind].append(run_once(kind, size, env, servers.workdir))
    return times


def report(times: dict[str, list[float]], size: int, repeats: int) -> list[str]:
    group, chord = harness.median(times["group"]), harness.median(times["chord"])
    return [
        f"Chord vs group: {size} parts, project worker (prefork 2), Redis results; median of {repeats}",
        f"  group of {size}: {group:.2f} s   runs: {', '.join(f'{t:.2f}' for t in times['group'])}",
        f"  chord of {size} + callback: {chord:.2f} s   runs: {', '.join(f'{t:.2f}' for t in times['chord'])}",
        f"  chord / group: {chord / group:.2f}x",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with harness.servers() as servers:
        database_url = harness.fresh_database(servers.database_url)
        print("\n".join(report(measure(servers, database_url, args.size, args.repeats), args.size, args.repeats)))


if __name__ == "__main__":
    main()
