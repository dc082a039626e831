"""Security (README, "Security"): `check --deploy` with the chart's production environment, https
behind the chart's TLS ingress and plain http locally, trusted proxies, the Content-Security-Policy
of the web and of Flower, admin password rules and lock-out, and health output without error text.
The browser test (chromium, the Debian package) is at the end."""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from project.embedded import wait_for_port
from tests.browser import launch_chromium, needs_chromium
from tests.conftest import http
from tests.deploy.conftest import COMPONENT_LABEL as COMPONENT
from tests.deploy.conftest import deep_merge, load_values, main_container, render_chart, workloads
from tests.deploy.test_chart_invariants import effective_env
from tests.processes import REPO_ROOT, Service, subprocess_env
from tests.resources import free_port

# In a parallel run this module stays in one process: collectstatic and Flower run once for the module.
pytestmark = pytest.mark.xdist_group("security")

ENTRYPOINT = REPO_ROOT / "deploy" / "image" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent
FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-test-password"
FLOWER_AUTH = {"Authorization": "Basic " + base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()}


def chart_env(values: dict, component: str = "web") -> dict:
    """The environment the chart gives a role's container."""
    docs = render_chart(values)
    (workload,) = [w for w in workloads(docs, component)]
    return effective_env(docs, main_container(workload))


def manage(env: dict, *args: str) -> subprocess.CompletedProcess:
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=clean, capture_output=True, text=True, timeout=120
    )


# --- manage.py check --deploy with the chart's environment -------------------------------------


@pytest.mark.subprocess
def test_check_deploy_reports_nothing_with_the_charts_production_environment():
    env = chart_env(load_values("production-values.yaml"))

    run = manage(env, "check", "--deploy", "--fail-level", "WARNING")

    assert run.returncode == 0, run.stdout + run.stderr
    assert "System check identified no issues (0 silenced)." in run.stdout


@pytest.mark.subprocess
def test_check_deploy_flags_the_plain_http_settings_the_chart_gives_without_tls():
    # The same check fails where it should: the minimal values have no TLS ingress.
    env = chart_env(load_values("minimal-values.yaml"))

    run = manage(env, "check", "--deploy", "--fail-level", "WARNING")

    assert run.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in run.stderr, run.stderr


SHOW_SECURITY = (
    "import django, json; django.setup(); from django.conf import settings as s; print(json.dumps({"
    "'redirect': s.SECURE_SSL_REDIRECT, 'hsts': s.SECURE_HSTS_SECONDS, 'session': s.SESSION_COOKIE_SECURE, "
    "'csrf': s.CSRF_COOKIE_SECURE, 'proxy': s.SECURE_PROXY_SSL_HEADER, 'exempt': s.SECURE_REDIRECT_EXEMPT}))"
)


def security_settings(env: dict) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_", "CACHE_"))}
    run = subprocess.run(
        [sys.executable, "-c", SHOW_SECURITY],
        cwd=REPO_ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "project.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.subprocess
def test_https_settings_are_off_for_make_run():
    values = security_settings({"DJANGO_DEBUG": "true"})

    assert values == {
        "redirect": False,
        "hsts": 0,
        "session": False,
        "csrf": False,
        "proxy": None,
        "exempt": [r"^api/health/(live|ready)$"],
    }


@pytest.mark.subprocess
def test_the_charts_production_environment_turns_https_on_and_trusts_x_forwarded_proto():
    env = chart_env(load_values("production-values.yaml"))

    values = security_settings(env)

    assert values["redirect"]
    assert values["session"]
    assert values["csrf"]
    assert values["hsts"] == 31536000
    assert values["proxy"] == ["HTTP_X_FORWARDED_PROTO", "https"]


@pytest.mark.parametrize(
    ("overrides", "https"),
    [
        ({}, True),  # production: ingress with TLS
        ({"ingress": {"tls": []}}, False),
        ({"ingress": {"tls": []}, "config": {"https": True}}, True),  # TLS ends before the ingress
        ({"config": {"https": False}}, False),
    ],
)
def test_the_chart_turns_https_on_with_a_tls_ingress_or_when_told(overrides, https):
    env = chart_env(deep_merge(load_values("production-values.yaml"), overrides))

    assert env["DJANGO_SECURE_SSL_REDIRECT"] == str(https).lower()
    assert env["DJANGO_SECURE_HSTS_SECONDS"] == ("31536000" if https else "0")
    assert env["DJANGO_SECURE_PROXY_SSL_HEADER"] == "X-Forwarded-Proto"


def test_web_trusts_forwarded_headers_from_the_private_ranges_only_by_default():
    env = chart_env(load_values("production-values.yaml"))

    assert env["FORWARDED_ALLOW_IPS"].split(",") == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]


def test_no_service_or_ingress_routes_to_flowers_metrics_port():
    docs = render_chart(load_values("production-values.yaml"))
    (flower,) = workloads(docs, "flower")
    assert {p["name"] for p in main_container(flower)["ports"]} == {"flower", "metrics"}

    flower_services = [d for d in docs if d["kind"] == "Service" and d["spec"]["selector"].get(COMPONENT) == "flower"]
    assert flower_services
    assert {p["targetPort"] for s in flower_services for p in s["spec"]["ports"]} == {"flower"}
    backends = {
        (path["backend"]["service"]["name"], path["backend"]["service"]["port"]["name"])
        for ingress in docs
        if ingress["kind"] == "Ingress"
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert {port for _, port in backends} == {"http", "flower"}


# --- gunicorn behind the ingress: probes, redirect, proxy trust --------------------------------


def production_web_env(tmp: Path, static_root: Path, **overrides) -> dict:
    env = chart_env(load_values("production-values.yaml"))
    env.update(
        subprocess_env(
            PATH=f"{VENV_BIN}:{os.environ['PATH']}",
            HOME=str(tmp),
            APP_RUNTIME_DIR=str(tmp),
            PROMETHEUS_MULTIPROC_BASE_DIR=str(tmp / "prometheus"),
            DJANGO_STATIC_ROOT=str(static_root),
            CELERY_BROKER_URL=os.environ["CELERY_BROKER_URL"],
            CACHE_URL=os.environ["CACHE_URL"],
            WEB_CONCURRENCY="1",
            **{"WEB_METRICS_PORT": "0", **overrides},
        )
    )
    return env


@pytest.fixture(scope="module")
def static_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("static")
    env = {**os.environ, "DJANGO_SECRET_KEY": "static", "DJANGO_STATIC_ROOT": str(root)}
    run = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return root


@pytest.fixture
def start_role(tmp_path):
    services = []

    def start(role: str, env: dict, port_variable: str) -> int:
        port = free_port()
        env = {**env, port_variable: str(port)}
        service = Service(f"{role}-{port}", ["sh", str(ENTRYPOINT), role], env, tmp_path)
        services.append(service)
        wait_for_port(port, timeout=60, process=service.process)
        return port

    yield start
    for service in services:
        service.stop()


def fetch(port: int, path: str, headers: dict | None = None):
    """GET without following redirects (as the kubelet does not for another scheme); the response, read."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response
    finally:
        connection.close()


def kubelet_get(port: int, probe: dict) -> int:
    get = probe["httpGet"]
    headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
    return fetch(port, get["path"], headers).status


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_behind_tls_the_probes_still_answer_200_over_plain_http_and_everything_else_redirects(
    tmp_path, static_root, start_role
):
    (tmp_path / "prometheus").mkdir()
    docs = render_chart(load_values("production-values.yaml"))
    (web,) = workloads(docs, "web")
    container = main_container(web)
    # The chart's FORWARDED_ALLOW_IPS: this test's loopback client is not a trusted proxy.
    metrics_port = free_port()
    port = start_role("web", production_web_env(tmp_path, static_root, WEB_METRICS_PORT=str(metrics_port)), "PORT")

    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        # 200 exactly: a kubelet counts a redirect as success (and would then follow it to https).
        assert kubelet_get(port, container[kind]) == 200, kind
    # Prometheus scrapes the metrics listener over plain http, by the pod's address.
    assert fetch(metrics_port, "/metrics", {"Host": "10.1.2.3:9808"}).status == 200

    response = fetch(port, "/admin/login/", {"Host": "celery.example.com"})
    assert response.status == 301
    assert response.headers["Location"] == "https://celery.example.com/admin/login/"
    # A client that reaches gunicorn directly cannot claim https: gunicorn drops the header.
    response = fetch(port, "/admin/login/", {"Host": "celery.example.com", "X-Forwarded-Proto": "https"})
    assert response.status == 301


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_behind_the_trusted_proxy_pages_get_hsts_secure_cookies_and_a_csp(tmp_path, static_root, start_role):
    (tmp_path / "prometheus").mkdir()
    port = start_role("web", production_web_env(tmp_path, static_root, FORWARDED_ALLOW_IPS="127.0.0.1"), "PORT")
    response = fetch(port, "/admin/login/", {"Host": "celery.example.com", "X-Forwarded-Proto": "https"})

    assert response.status == 200
    headers = response.headers
    assert headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    cookies = headers.get_all("Set-Cookie")
    assert any(c.startswith("csrftoken=") for c in cookies)
    assert all("Secure" in c for c in cookies), cookies
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp
    assert "'unsafe-eval'" not in csp
    # The probe paths are not redirected, and the API docs get the same policy.
    assert (
        fetch(port, "/api/docs", {"Host": "celery.example.com", "X-Forwarded-Proto": "https"}).headers[
            "Content-Security-Policy"
        ]
        == csp
    )


def test_gunicorn_drops_forwarded_headers_from_peers_outside_forwarded_allow_ips(monkeypatch, tmp_path):
    from gunicorn.config import Config

    # Importing the config points prometheus-client at a multiprocess folder (its own, emptied):
    # a scratch one, forgotten after this test, or this process's /metrics reads it from then on.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "web"))
    from project import gunicorn_conf

    cfg = Config()
    cfg.set("forwarded_allow_ips", "10.0.0.0/8,fc00::/7")
    worker = SimpleNamespace(cfg=cfg)
    headers = [("HOST", "x"), ("X-FORWARDED-FOR", "203.0.113.9"), ("X-FORWARDED-PROTO", "https"), ("FORWARDED", "f")]

    for peer, kept in [
        (("10.4.0.7", 50000), True),
        (("fd12::1", 50000), True),
        (("127.0.0.1", 50000), False),
        (("203.0.113.9", 50000), False),
    ]:
        req = SimpleNamespace(peer_addr=peer, headers=list(headers))
        gunicorn_conf.pre_request(worker, req)
        assert (req.headers == headers) is kept, (peer, req.headers)
        if not kept:
            assert req.headers == [("HOST", "x")]


# --- Admin: password rules and lock-out ----------------------------------------------------------


def test_weak_admin_passwords_are_refused():
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError

    for weak in ("1", "12345678901234", "password1234", "admin-admin"):
        with pytest.raises(ValidationError):
            validate_password(weak)
    validate_password("correct horse battery staple")


@pytest.mark.django_db
def test_the_admin_add_user_form_refuses_a_password_of_1(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "a long enough secret 1")
    client.force_login(admin)

    response = client.post(
        "/admin/auth/user/add/", {"username": "weak", "password1": "1", "password2": "1", "usable_password": "true"}
    )

    assert response.status_code == 200  # the form again, with its errors
    assert not django_user_model.objects.filter(username="weak").exists()
    assert "This password is too short" in response.content.decode()


def admin_login(client, password: str, **environ):
    return client.post("/admin/login/?next=/admin/", {"username": "root", "password": password}, **environ)


@pytest.mark.django_db
def test_repeated_failed_admin_logins_lock_the_client_out(client, django_user_model, settings):
    django_user_model.objects.create_superuser("root", "root@example.com", "a long enough secret 1")

    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert admin_login(client, "wrong").status_code == 200  # the form again
    assert admin_login(client, "wrong").status_code == 429
    # Locked out: the right password is refused too, until AXES_COOLOFF_MINUTES pass.
    assert admin_login(client, "a long enough secret 1").status_code == 429
    # Another client is not.
    assert admin_login(client, "a long enough secret 1", REMOTE_ADDR="192.0.2.50").status_code == 302


@pytest.mark.django_db
def test_the_lock_out_counts_the_address_the_trusted_proxy_saw_not_one_the_client_claims(
    client, django_user_model, settings
):
    django_user_model.objects.create_superuser("root", "root@example.com", "a long enough secret 1")

    # The client forges entries to the left; the proxy appends the address it saw (the right-most).
    for forged in range(settings.AXES_FAILURE_LIMIT):
        admin_login(client, "wrong", HTTP_X_FORWARDED_FOR=f"198.51.100.{forged}, 203.0.113.7")

    assert admin_login(client, "a long enough secret 1", HTTP_X_FORWARDED_FOR="203.0.113.7").status_code == 429
    assert admin_login(client, "a long enough secret 1", HTTP_X_FORWARDED_FOR="203.0.113.8").status_code == 302


# --- Health output -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_health_names_each_check_and_its_state_but_never_the_error_text(client, monkeypatch, caplog):
    from app import health

    def refused():
        raise ConnectionError("Error 111 connecting to 10.9.8.7:6379. Connection refused.")

    monkeypatch.setitem(health.CHECKS, "broker", refused)

    response = client.get("/api/health/")

    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["broker"]["state"] == "failing"
    assert body["checks"]["database"]["state"] == "ok"
    assert set(body["checks"]["broker"]) == {"healthy", "state", "latency_ms"}
    assert "10.9.8.7" not in response.content.decode()
    assert "Error 111" not in response.content.decode()
    # The text is in the log, for whoever runs the service.
    assert any("10.9.8.7" in record.getMessage() for record in caplog.records)


def test_readiness_that_times_out_names_each_check_as_timed_out(monkeypatch, settings):
    import time

    from app import health

    monkeypatch.setattr(health, "run_checks", lambda: time.sleep(1) or {"healthy": True, "checks": {}})
    monkeypatch.setattr(health, "_cached", None)
    monkeypatch.setattr(health, "_running", None)
    settings.HEALTH_READY_TIMEOUT_SECONDS = 0.1

    report = health.run_checks_cached()

    assert report == {
        "healthy": False,
        "checks": {name: {"healthy": False, "state": "timed out"} for name in health.CHECKS},
    }
    time.sleep(1)


# --- Flower: authentication everywhere, metrics on their own port, its CSP ----------------------


def flower_env(port: int, **extra: str) -> dict:
    """The image's flower role on loopback `port`, with basic auth."""
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "DJANGO_SECRET_KEY": "flower-tests",
        "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}",
        "FLOWER_PORT": str(port),
        "FLOWER_ADDRESS": "127.0.0.1",
        **extra,
    }


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    """Flower through the image's entrypoint, with basic auth and a metrics port."""
    tmp = tmp_path_factory.mktemp("flower")
    port, metrics_port = free_port(), free_port()
    env = flower_env(port, FLOWER_METRICS_PORT=str(metrics_port))
    service = Service(f"flower-{port}", ["sh", str(ENTRYPOINT), "flower"], env, tmp)
    try:
        wait_for_port(port, timeout=60, process=service.process)
        wait_for_port(metrics_port, timeout=30, process=service.process)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", metrics_url=f"http://127.0.0.1:{metrics_port}")
    finally:
        service.stop()


FLOWER_PAGES = ("/", "/workers", "/tasks", "/broker", "/worker/nobody", "/task/unknown", "/metrics", "/api/workers")


@pytest.mark.integration
@pytest.mark.parametrize("path", FLOWER_PAGES)
def test_every_flower_page_and_its_metrics_need_credentials(flower, path):
    assert http("GET", flower.url + path)[0] == 401
    assert http("GET", flower.url + path, headers={"Authorization": "Basic b3BzOndyb25n"})[0] == 401  # ops:wrong
    assert http("GET", flower.url + path, headers=FLOWER_AUTH)[0] != 401


@pytest.mark.integration
def test_flower_under_a_url_prefix_asks_for_credentials_on_metrics_too(tmp_path):
    # The chart's ingress routes /flower there, with FLOWER_URL_PREFIX=flower.
    port = free_port()
    env = flower_env(port, FLOWER_URL_PREFIX="flower")
    service = Service(f"flower-prefix-{port}", ["sh", str(ENTRYPOINT), "flower"], env, tmp_path)
    try:
        wait_for_port(port, timeout=60, process=service.process)
        base = f"http://127.0.0.1:{port}/flower"
        for path in ("/", "/metrics", "/api/workers"):
            assert http("GET", base + path)[0] == 401, path
        status, body = http("GET", base + "/metrics", headers=FLOWER_AUTH)
        assert status == 200
        assert b"# HELP flower_" in body
        assert http("GET", base + "/healthcheck")[0] == 200
    finally:
        service.stop()


@pytest.mark.integration
def test_flowers_probe_path_stays_open(flower):
    assert http("GET", flower.url + "/healthcheck") == (200, b"OK")


@pytest.mark.integration
def test_flowers_metrics_port_serves_metrics_without_credentials_and_nothing_else(flower):
    status, body = http("GET", flower.metrics_url + "/metrics")

    assert status == 200
    assert b"# HELP flower_" in body
    assert http("GET", flower.metrics_url + "/")[0] == 404
    assert http("GET", flower.metrics_url + "/workers")[0] == 404


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/", "/tasks", "/static/js/flower.js", "/nothing-here", "/healthcheck"])
def test_flower_sends_its_content_security_policy_on_every_response(flower, path):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(flower.url + path, headers=FLOWER_AUTH)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            headers = response.headers
    except urllib.error.HTTPError as error:
        headers = error.headers

    from project.flower_app import CONTENT_SECURITY_POLICY

    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@pytest.mark.integration
def test_flowers_inline_scripts_and_styles_are_exactly_the_hashed_ones(flower):
    # A Flower upgrade that changes them fails here (the browser test below would show the block).
    from project.flower_app import INLINE_SCRIPT_HASHES, INLINE_STYLE_HASHES

    _, page = http("GET", flower.url + "/workers", headers=FLOWER_AUTH)
    scripts = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", page.decode(), re.S)

    assert scripts, "Flower's workers page has its inline script"
    assert {sha256_source(script) for script in scripts} <= set(INLINE_SCRIPT_HASHES)
    assert sha256_source("\nvar autorefresh = 0;\n") in INLINE_SCRIPT_HASHES
    flower_dir = Path(__import__("flower").__file__).parent
    styles = set(
        re.findall(r'style="([^"]*)"', "".join(p.read_text() for p in (flower_dir / "templates").glob("*.html")))
    )
    assert {sha256_source(style) for style in styles} == set(INLINE_STYLE_HASHES)


# --- In a real browser: no CSP violation on the admin, the API docs and Flower -----------------


@pytest.mark.integration
@needs_chromium
@pytest.mark.django_db(transaction=True)
def test_admin_api_docs_and_flower_work_in_chromium_without_csp_violations(
    tmp_path, static_root, start_role, flower, redis_worker, django_user_model
):
    from playwright.sync_api import sync_playwright

    (tmp_path / "prometheus").mkdir()
    root = django_user_model.objects.create_superuser("root", "root@example.com", "a long enough secret 1")
    # The chart's production environment, served over plain http here (the CSP is the same).
    env = production_web_env(tmp_path, static_root, DJANGO_SECURE_SSL_REDIRECT="false", DJANGO_SECURE_HSTS_SECONDS="0")
    env["DJANGO_ALLOWED_HOSTS"] += ",127.0.0.1"
    web = f"http://127.0.0.1:{start_role('web', env, 'PORT')}"

    violations, errors = [], []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        context = browser.new_context(http_credentials={"username": FLOWER_USER, "password": FLOWER_PASSWORD})
        context.add_init_script(
            "document.addEventListener('securitypolicyviolation', e => "
            "(window.__csp = window.__csp || []).push(e.violatedDirective + ' ' + e.blockedURI));"
        )
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)

        def visit(url: str, ready: str) -> None:
            page.goto(url)
            page.wait_for_selector(ready, timeout=20_000, state="attached")
            page.wait_for_timeout(300)
            violations.extend(page.evaluate("window.__csp || []"))

        visit(f"{web}/admin/login/", "#id_username")
        page.fill("#id_username", "root")
        page.fill("#id_password", "a long enough secret 1")
        page.click("input[type=submit]")
        page.wait_for_url(f"{web}/admin/")
        visit(f"{web}/admin/", "#content")
        # The user form: SelectFilter (JS widgets) and the password fields.
        visit(f"{web}/admin/auth/user/add/", "#id_username")
        visit(f"{web}/admin/auth/user/{root.pk}/change/", "#id_groups_from")
        visit(f"{web}/admin/app/tasklog/", "#changelist")
        # Swagger UI: rendered by its local script, the operations listed, one opened.
        visit(f"{web}/api/docs", ".opblock")
        page.click(".opblock-summary >> nth=0")
        page.wait_for_selector(".opblock-body", timeout=10_000)
        violations.extend(page.evaluate("window.__csp || []"))
        # Flower: the dashboard (its inline script), tasks, and a live worker's page (its style attribute).
        for path, ready in (
            ("/", "#workers-table"),
            ("/tasks", "#tasks-table"),
            ("/workers", "#workers-table"),
            (f"/worker/{redis_worker.hostname}", "#limits-table"),
        ):
            visit(flower.url + path, ready)
        browser.close()

    assert violations == [], violations
    assert errors == [], errors
