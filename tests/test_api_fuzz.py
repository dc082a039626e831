"""Schemathesis against the live OpenAPI schema of a real gunicorn: every check (server errors,
status codes, content types, response schemas and headers, negative data rejected, positive
data accepted, unsupported methods, authentication), a bounded number of examples, 0 failures.

Every request sends a valid token, reads included."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import REPO_ROOT
from tests.resources import empty_redis_db

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# Examples per operation and phase: about 1,000 cases in all, half a minute on 2 cores. One worker: with more,
# hypothesis' parsing of lambda sources (not thread-safe) sometimes stops a phase with an error.
MAX_EXAMPLES = 25
# The broker and result backend of the web under test: the tasks valid data queues (hundreds,
# some of them minutes long) stay out of the suite's queues, where a running worker would take them.
CONFIG = REPO_ROOT / "tests" / "schemathesis.toml"
HOOKS = REPO_ROOT / "tests" / "schemathesis_hooks.py"


def schemathesis_run(base: str, token: str, scratch: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color",
        "run", f"{base}/api/openapi.json",
        "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--workers", "1",
        "--header", f"Authorization: Bearer {token}",
    ]  # fmt: skip
    # Hypothesis keeps its files (a Unicode table) in scratch, not in the work tree.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "HYPOTHESIS_STORAGE_DIRECTORY": str(scratch)}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_schemathesis_finds_no_failure_against_a_live_server(start_web, api_token, tmp_path):
    with empty_redis_db() as redis_url:
        base = start_web(CELERY_BROKER_URL=redis_url, RESULT_BACKEND_URL=redis_url)
        run = schemathesis_run(base, api_token, tmp_path)

    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-3000:]
    summary = run.stdout[run.stdout.rindex("SUMMARY") :]
    assert "Tested: 15" in summary, summary  # every operation in the schema
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", summary).groups())
    assert generated == passed, summary
    assert generated > 500, f"{generated} cases: too few to mean anything"
