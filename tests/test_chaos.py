"""The smaller chaos run of `make chaos` (tests/chaos/run.py), in the suite: 300 task ids through
the API's code path and canvases, three SIGKILLs, a broker restart and a rolling warm restart,
on a Redis broker of its own with short time limits (a 10 s visibility timeout). Nothing
at-least-once may be lost and nothing at-most-once may run twice."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


@pytest.mark.timeout(400)
def test_a_short_chaos_run_loses_nothing():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.chaos.run",
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
    assert "lost (at least once, not final)                   0" in run.stdout, output
    assert "run more than once (at most once: never allowed)  0" in run.stdout, output
    # Not asserted here: "stuck". An at-most-once task whose worker is SIGKILLed right after it
    # started can stay STARTED: the worker buffers its task events, so beat may never hear of the
    # start (app/lost_tasks.py). make chaos reports and fails on it; see the README.
