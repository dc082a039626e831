"""`make bench`: every benchmark in one run, side by side, as ratios; the report is printed and
written to tests/benchmarks/results/ (report.txt and capacity.png, which the README shows).

    python -m tests.benchmarks.run [--quick]

Uses DATABASE_URL and REDIS_URL when set, embedded PostgreSQL and Redis otherwise.
"""

import argparse
import datetime as dt
import os
import platform
from pathlib import Path

from tests.benchmarks import (
    api_throughput,
    capacity,
    chord_vs_group,
    harness,
    publish_confirms,
    startup_memory,
    worker_throughput,
)

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tasks and repeats: a smoke run, not figures")
    args = parser.parse_args()
    # Five rounds of every throughput mode, interleaved: a burst of noise on this shared machine
    # then moves one round of each, not a median.
    tasks, repeats = (400, 1) if args.quick else (3000, 5)

    lines = [f"make bench, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {_cores()} cores", ""]
    with harness.servers() as servers:
        database_url = harness.fresh_database(servers.database_url)
        # Start-up first, on a quiet machine: the throughput runs leave the database busy a while.
        startup = startup_memory.measure(servers, database_url, 1 if args.quick else 5)
        lines += [*startup_memory.report(startup, 1 if args.quick else 5), ""]
        throughput = worker_throughput.measure(servers, database_url, tasks, repeats)
        lines += [*worker_throughput.report(throughput, tasks, repeats), ""]
        chords = chord_vs_group.measure(servers, database_url, 1000, min(repeats, 3))
        lines += [*chord_vs_group.report(chords, 1000, min(repeats, 3)), ""]
        seconds, rounds = (2, 1) if args.quick else (5, 5)
        api = api_throughput.measure(servers, database_url, seconds, rounds)
        lines += [*api_throughput.report(api, seconds, rounds), ""]
        if os.environ.get("RABBITMQ_URL"):
            messages, rounds = (300, 1) if args.quick else (3000, 3)
            confirms = publish_confirms.measure(os.environ["RABBITMQ_URL"], messages, rounds)
            lines += [*publish_confirms.report(confirms, messages, rounds), ""]
        scales = capacity.measure(servers, database_url, 600 if args.quick else 3000)
        lines += capacity.report(scales)
    print("\n".join(lines))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "report.txt").write_text("\n".join(lines) + "\n")
        capacity.plot(scales, RESULTS / "capacity.png")
        print(f"\nWritten: {RESULTS / 'report.txt'}, {RESULTS / 'capacity.png'}")


def _cores() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
