"""The smaller chaos runs of `make chaos` (tests/chaos/run.py), in the suite: 300 task ids through
the API's code path and canvases, three SIGKILLs, a broker restart and a rolling warm restart,
on a broker of its own (Redis, and RabbitMQ where Debian's rabbitmq-server is installed) with
short time limits (on Redis, a 10 s visibility timeout). Nothing
at-least-once may be lost, nothing that ran may be left without a final state, and nothing
at-most-once may run twice."""

import re
import subprocess
import sys

import pytest

from tests.chaos.run import RABBITMQ_SERVER
from tests.processes import REPO_ROOT

pytestmark = pytest.mark.integration


@pytest.mark.timeout(400)
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_short_chaos_run_loses_nothing(broker):
    if broker == "rabbitmq" and not RABBITMQ_SERVER.exists():
        pytest.skip(
            f"{RABBITMQ_SERVER} not found: the RabbitMQ chaos run starts a node of its own (Debian's rabbitmq-server)"
        )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.chaos.run",
            "--broker",
            broker,
            "--tasks",
            "300",
            "--kills",
            "3",
            "--seconds",
            "20",
            "--short-limits",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=380,
    )

    output = run.stdout[-4000:] + run.stderr[-4000:]
    assert "settled" in run.stdout, output
    assert figure(run.stdout, "lost (at least once, not final)") == 0, output
    assert figure(run.stdout, "stuck (ran, state not final)") == 0, output
    assert figure(run.stdout, "run more than once (at most once: never allowed)") == 0, output


def figure(report: str, name: str) -> int:
    found = re.search(rf"^  {re.escape(name)} +(\d+)$", report, re.MULTILINE)
    assert found, f"no {name!r} in the report:\n{report[-3000:]}"
    return int(found.group(1))
