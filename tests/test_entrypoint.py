"""The image's entrypoint roles, run as local processes (the container runs are in
test_image.py): migrate under a lock, flower's refusal without complete authentication, the JSON
access log."""

import json
import os
import subprocess
import sys
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest

from project.embedded import wait_for_port
from tests.conftest import http
from tests.processes import REPO_ROOT
from tests.resources import free_port

ENTRYPOINT = REPO_ROOT / "deploy" / "image" / "entrypoint.sh"

# Every test runs the entrypoint script: a role started, or refused at its start.
pytestmark = pytest.mark.integration


def role_env(**overrides) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def test_two_migrate_roles_started_at_once_both_succeed(fresh_database_url):
    env = role_env(DATABASE_URL=fresh_database_url)
    runs = [
        subprocess.Popen(
            [str(ENTRYPOINT), "migrate"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=180)[0].decode() for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs
    assert all("Migrated." in output for output in outputs)
    # Exactly one of them created the default schedules; the other found them.
    assert sum("created: none needed" in output for output in outputs) == 1


def test_migrate_gives_up_on_an_unreachable_database_within_its_wait():
    env = role_env(DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/nothing")
    started = time.monotonic()

    run = subprocess.run(
        [str(ENTRYPOINT), "migrate", "--wait", "2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert run.returncode != 0
    assert "database not reachable after 2 s" in run.stderr
    assert time.monotonic() - started < 30


def test_flower_refuses_to_start_without_authentication():
    env = role_env()
    env.pop("FLOWER_BASIC_AUTH", None)
    env.pop("FLOWER_AUTH_PROVIDER", None)

    run = subprocess.run(
        [str(ENTRYPOINT), "flower"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert run.returncode == 64
    assert "refusing to start without authentication" in run.stderr


OAUTH = {
    "FLOWER_AUTH_PROVIDER": "flower.views.auth.GoogleLoginHandler",
    "FLOWER_AUTH": r".*@example\.com",
    "FLOWER_OAUTH2_KEY": "key",
    "FLOWER_OAUTH2_SECRET": "secret",
    "FLOWER_OAUTH2_REDIRECT_URI": "https://celery.example.com/flower/login",
}


@pytest.mark.parametrize(
    ("flower_env", "missing"),
    [
        # The review's case: a provider without FLOWER_AUTH let everyone in.
        ({"FLOWER_AUTH_PROVIDER": OAUTH["FLOWER_AUTH_PROVIDER"]}, "FLOWER_AUTH FLOWER_OAUTH2_KEY"),
        ({k: v for k, v in OAUTH.items() if k != "FLOWER_AUTH"}, "missing: FLOWER_AUTH ("),
        ({k: v for k, v in OAUTH.items() if k != "FLOWER_OAUTH2_SECRET"}, "missing: FLOWER_OAUTH2_SECRET ("),
        ({k: v for k, v in OAUTH.items() if k != "FLOWER_AUTH_PROVIDER"}, "missing: FLOWER_AUTH_PROVIDER ("),
        ({**OAUTH, "FLOWER_AUTH_PROVIDER": "flower.views.auth.OktaLoginHandler"}, "FLOWER_OAUTH2_OKTA_BASE_URL"),
        # Basic auth beside half an OAuth setting is refused too: the setting is wrong either way.
        ({"FLOWER_BASIC_AUTH": "ops:pw", "FLOWER_AUTH_PROVIDER": OAUTH["FLOWER_AUTH_PROVIDER"]}, "FLOWER_AUTH "),
        ({"FLOWER_BASIC_AUTH": "ops:"}, "incomplete FLOWER_BASIC_AUTH"),
        ({"FLOWER_BASIC_AUTH": ":pw"}, "incomplete FLOWER_BASIC_AUTH"),
        ({"FLOWER_BASIC_AUTH": "ops:pw,,other:pw"}, "incomplete FLOWER_BASIC_AUTH"),
        ({"FLOWER_BASIC_AUTH": "ops"}, "incomplete FLOWER_BASIC_AUTH"),
    ],
)
def test_flower_refuses_an_incomplete_authentication_setting(flower_env, missing):
    env = {k: v for k, v in role_env().items() if not k.startswith(("FLOWER_AUTH", "FLOWER_OAUTH2", "FLOWER_BASIC"))}

    run = subprocess.run(
        [str(ENTRYPOINT), "flower"],
        cwd=REPO_ROOT,
        env={**env, **flower_env},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert run.returncode == 64, run.stderr
    assert "flower: refusing to start with an incomplete" in run.stderr
    assert missing in run.stderr


def test_flower_starts_with_a_complete_oauth_setting_and_sends_visitors_to_log_in(tmp_path):
    port = free_port()
    env = {**role_env(FLOWER_PORT=port, FLOWER_ADDRESS="127.0.0.1", DJANGO_SECRET_KEY="x"), **OAUTH}
    env.pop("FLOWER_BASIC_AUTH", None)
    with open(tmp_path / "flower.log", "wb") as log:
        flower = subprocess.Popen([str(ENTRYPOINT), "flower"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        try:
            wait_for_port(port, timeout=60, process=flower)
            for path in ("/", "/workers", "/metrics"):
                connection = HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", path)
                response = connection.getresponse()
                # Not a page: the OAuth login (the provider's redirect is not followed here).
                assert response.status == 302, (path, response.status)
                assert response.headers["Location"].startswith("/login?next="), response.headers["Location"]
                connection.close()
        finally:
            flower.terminate()
            flower.wait(timeout=30)


def test_an_unknown_role_is_refused():
    run = subprocess.run([str(ENTRYPOINT), "wizard"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)

    assert run.returncode == 64
    assert "unknown role 'wizard'" in run.stderr


@pytest.mark.django_db(transaction=True)
def test_web_role_writes_one_json_access_log_line_per_request(tmp_path):
    from tests.conftest import make_api_token
    from tests.processes import subprocess_env

    token = make_api_token("read")
    port = free_port()
    log_path = tmp_path / "web.log"
    # No metrics listener: its fixed default port may be taken by another web on this host.
    env = subprocess_env(
        PORT=port, WEB_METRICS_PORT=0, WEB_CONCURRENCY=1, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    with open(log_path, "wb") as log:
        web = subprocess.Popen([str(ENTRYPOINT), "web"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, timeout=30, process=web)
            status, _ = http(
                "GET",
                f"http://127.0.0.1:{port}/api/task-overview/?x=%22quoted%22",
                headers={"X-Request-ID": "req-1", "Authorization": f"Bearer {token}"},
            )
            assert status == 200
        finally:
            web.terminate()
            web.wait(timeout=30)

    access = [json.loads(line) for line in log_path.read_text().splitlines() if '"gunicorn.access"' in line]
    assert len(access) == 1
    assert access[0]["method"] == "GET"
    assert access[0]["path"] == "/api/task-overview/"
    assert access[0]["query"] == "x=%22quoted%22"
    assert access[0]["status"] == 200
    assert access[0]["request_id"] == "req-1"
    assert access[0]["duration_ms"] > 0
    assert token not in log_path.read_text()
