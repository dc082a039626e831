"""Schemathesis against the live OpenAPI schema of a real gunicorn: every check (server errors,
status codes, content types, response schemas and headers, negative data rejected, positive
data accepted, unsupported methods, authentication), a bounded number of examples, 0 failures.

Every request sends a valid token, reads included."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# Per operation and phase: the run takes about half a minute (2 cores).
MAX_EXAMPLES = 25
CONFIG = REPO_ROOT / "tests" / "schemathesis.toml"
HOOKS = REPO_ROOT / "tests" / "schemathesis_hooks.py"


def schemathesis_run(base: str, token: str, report: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color",
        "run", f"{base}/api/openapi.json",
        "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--workers", "1",
        "--header", f"Authorization: Bearer {token}",
        "--report", "ndjson", "--report-ndjson-path", report,
    ]  # fmt: skip
    # Hypothesis keeps its files (a Unicode table) next to the report, not in the work tree.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "HYPOTHESIS_STORAGE_DIRECTORY": str(Path(report).parent)}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_schemathesis_finds_no_failure_against_a_live_server(start_web, api_token, tmp_path):
    base = start_web()
    report = tmp_path / "events.ndjson"

    run = schemathesis_run(base, api_token, str(report))

    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-3000:]
    summary = run.stdout[run.stdout.rindex("SUMMARY") :]
    assert "Tested: 15" in summary, summary  # every operation in the schema
    events = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(events) > 100, "schemathesis ran too few cases to mean anything"
