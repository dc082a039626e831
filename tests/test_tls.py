"""TLS to Redis and RabbitMQ (project/tls.py), end to end.

Unit: half a setting is refused with a clear error. Integration: the chart's roles (web, the
default worker pool, beat, Flower), each started through the image's entrypoint with the
environment the chart renders for `tls` values, against a TLS-only Redis (which asks every client
for a certificate) and a TLS-only RabbitMQ node on loopback, both with certificates made here:
every probe passes, a chord runs through the API with its results, beat reads the queue lengths
and sees the worker, Flower reads the queue lengths, the history and the API tokens' cache work;
a wrong CA or a missing client certificate ends each role at start with the reason.
"""

import base64
import json
import re
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from project import tls
from project.embedded import EmbeddedPostgres
from tests.chart_roles import ENTRYPOINT, FLOWER_AUTH, KINDS, VENV_BIN, Stack
from tests.conftest import http, wait_until
from tests.deploy.conftest import deep_merge, load_values
from tests.processes import REPO_ROOT, Service
from tests.resources import free_port
from tests.tls_servers import TlsRabbitMQ, TlsRedis, Unavailable, make_certificates

# In a parallel run this module stays in one process: its certificates, servers and roles are started once for the module.
pytestmark = pytest.mark.xdist_group("tls")

ROLES = ("web", "worker-default", "beat", "flower")

# --- Unit: half a setting ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    try:
        return make_certificates(tmp_path_factory.mktemp("certificates"))
    except Unavailable as exc:
        pytest.skip(str(exc))


def files(certificates, *, client: bool = True) -> tls.TlsFiles:
    if not client:
        return tls.TlsFiles(str(certificates.ca))
    return tls.TlsFiles(str(certificates.ca), str(certificates.client_cert), str(certificates.client_key))


@pytest.mark.parametrize(
    ("urls", "tls_files", "message"),
    [
        ({"CELERY_BROKER_URL": "redis://r:6379/0"}, "ca", "use rediss:// or amqps:// URLs"),
        ({"CELERY_BROKER_URL": "rediss://r/0?ssl_cert_reqs=required"}, "ca", "give them in one place"),
        ({"CELERY_BROKER_URL": "redis://r/0?ssl_cert_reqs=required"}, "", "plain redis:// URL: use rediss://"),
        ({"CELERY_BROKER_URL": "amqps://r//?ssl_ca_certs=/ca.pem"}, "", "an amqps:// URL takes no ssl_* parameters"),
        ({"CELERY_BROKER_URL": "rediss://r/0?ssl_cert_reqs=maybe"}, "", "ssl_cert_reqs must be required"),
        (
            {"CELERY_BROKER_URL": "rediss://r:6380/0", "CACHE_URL": "redis://r:6380/1"},
            "",
            "CACHE_URL reaches r:6380 without TLS, CELERY_BROKER_URL with it",
        ),
        ({"CELERY_BROKER_URL": "rediss://r/0"}, "cert-only", "TLS_CERT_FILE is set without TLS_KEY_FILE"),
        ({"CELERY_BROKER_URL": "rediss://r/0"}, "missing-ca", "TLS_CA_FILE=/nowhere/ca.pem: no such file"),
        ({"CELERY_BROKER_URL": "rediss://r/0"}, "key-as-ca", "holds no PEM certificate"),
        ({"CELERY_BROKER_URL": "rediss://r/0"}, "swapped", "are not a PEM certificate and its private key"),
        (
            {"CELERY_BROKER_URL": "rediss://r/0?ssl_ca_certs=/nowhere/ca.pem"},
            "",
            "CELERY_BROKER_URL's ssl_ca_certs=/nowhere/ca.pem: no such file",
        ),
    ],
)
@pytest.mark.subprocess
def test_half_a_tls_setting_is_refused_naming_what_to_fix(certificates, urls, tls_files, message):
    ca, cert, key = str(certificates.ca), str(certificates.client_cert), str(certificates.client_key)
    given = {
        "": tls.TlsFiles(),
        "ca": tls.TlsFiles(ca),
        "cert-only": tls.TlsFiles(ca, cert),
        "missing-ca": tls.TlsFiles("/nowhere/ca.pem"),
        "key-as-ca": tls.TlsFiles(key),
        "swapped": tls.TlsFiles(ca, key, cert),
    }[tls_files]

    with pytest.raises(ValueError, match=re.escape(message)):
        tls.clients_for(urls, given)


@pytest.mark.subprocess
def test_every_client_of_a_tls_url_gets_the_same_checked_options(certificates):
    clients = tls.clients_for(
        {
            "CELERY_BROKER_URL": "amqps://app:pw@rabbitmq.internal/app",
            "RESULT_BACKEND_URL": "rediss://:pw@redis.internal:6380/0",
            "CACHE_URL": "locmemcache://",
        },
        files(certificates),
    )

    assert set(clients) == {"CELERY_BROKER_URL", "RESULT_BACKEND_URL"}
    assert clients["CELERY_BROKER_URL"].amqp_options() == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,  # kombu puts the URL's host here, so py-amqp checks the name
        "ca_certs": str(certificates.ca),
        "certfile": str(certificates.client_cert),
        "keyfile": str(certificates.client_key),
    }
    assert clients["RESULT_BACKEND_URL"].address == "redis.internal:6380"
    assert clients["RESULT_BACKEND_URL"].redis_options() == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(certificates.ca),
        "ssl_certfile": str(certificates.client_cert),
        "ssl_keyfile": str(certificates.client_key),
    }


def test_a_rediss_url_without_a_ca_verifies_against_the_system_cas():
    (client,) = tls.clients_for({"CELERY_BROKER_URL": "rediss://:pw@redis.example.com/0"}, tls.TlsFiles()).values()

    # kombu's own default for a bare rediss:// URL is CERT_NONE.
    assert client.redis_options() == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}


@pytest.mark.subprocess
def test_settings_refuse_half_a_tls_setting_at_start_up(certificates):
    env = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "DJANGO_SECRET_KEY": "tls-tests-only",
        "CELERY_BROKER_URL": "rediss://127.0.0.1:6380/0",
        "TLS_CERT_FILE": str(certificates.client_cert),
    }
    run = subprocess.run(
        ["sh", str(ENTRYPOINT), "manage", "check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert run.returncode != 0
    assert "ImproperlyConfigured: TLS_CERT_FILE is set without TLS_KEY_FILE" in run.stderr


# --- Integration: the chart's roles on TLS-only servers ---------------------------------------


def started(server):
    try:
        return server.start()
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tls_redis(certificates, tmp_path_factory):
    server = started(TlsRedis(certificates, tmp_path_factory.mktemp("tls-redis")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_rabbitmq(certificates, tmp_path_factory):
    server = started(TlsRabbitMQ(certificates, tmp_path_factory.mktemp("tls-rabbitmq")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres():
    """One PostgreSQL for both stacks (migrated by the first). As root, pgserver runs it as its own
    user, who must reach the folder: pytest's scratch folders are private to root."""
    folder = Path(tempfile.mkdtemp(prefix="tls-tests-pg-"))
    folder.chmod(0o755)
    server = EmbeddedPostgres(folder / "pg" / "data").start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def tls_values(broker_url: str) -> dict:
    """The chart with the CA and a client certificate from Secrets (cert-manager's shape)."""
    values = {
        "secrets": {"brokerUrl": broker_url},
        "tls": {"caSecret": "services-tls", "clientCertSecret": "services-tls"},
    }
    return deep_merge(load_values("minimal-values.yaml"), values)


def mount_secret_files(stack: Stack, certificates) -> None:
    """What the kubelet does: the Secret's keys as files where the chart mounts them (here under the
    scratch folder), so each role reads them at the paths the chart's ConfigMap names."""
    secret = {"ca.crt": certificates.ca, "tls.crt": certificates.client_cert, "tls.key": certificates.client_key}
    mounted = stack.scratch / "mounts"
    for role in stack.roles.values():
        for variable in ("TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE"):
            path = mounted / role.env[variable].lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(secret[path.name], path)
            role.env[variable] = str(path)


@pytest.fixture(scope="module", params=["rediss", "amqps"])
def stack(request, certificates, tls_redis, postgres, tmp_path_factory):
    """The four roles on a TLS broker (Redis, or RabbitMQ with the results and cache on the TLS
    Redis), each with the chart's environment."""
    if request.param == "rediss":
        broker_url = tls_redis.url(0)
    else:
        broker_url = request.getfixturevalue("tls_rabbitmq").url()
    services = {"CELERY_BROKER_URL": broker_url, "RESULT_BACKEND_URL": tls_redis.url(2), "CACHE_URL": tls_redis.url(1)}
    redis.Redis(port=tls_redis.port, **tls_redis_client_options(certificates)).flushall()
    stack = Stack(
        tmp_path_factory.mktemp(f"tls-{request.param}"),
        values=tls_values(broker_url),
        services=services,
        postgres=postgres,
    )
    try:
        mount_secret_files(stack, certificates)
        stack.roles["beat"].env["CELERY_METRICS_PORT"] = str(free_port())
        stack.migrate()
        stack.start(ROLES)
        stack.broker = request.param
        yield stack
    finally:
        stack.stop()


def tls_redis_client_options(certificates) -> dict:
    return {
        "ssl": True,
        "ssl_ca_certs": str(certificates.ca),
        "ssl_certfile": str(certificates.client_cert),
        "ssl_keyfile": str(certificates.client_key),
    }


def api_token(stack: Stack) -> str:
    code = (
        "import uuid; from django.contrib.auth import get_user_model; from app import services; "
        "name = f'tls-{uuid.uuid4().hex[:8]}'; user = get_user_model().objects.create_user(username=name); "
        "print(services.create_api_token(name=name, owner=user, scope='manage')[1])"
    )
    return stack.run("web", "manage", "shell", "-c", code).strip().splitlines()[-1]


def api(stack: Stack, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}", "Host": "localhost", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    status, raw = http(method, f"http://127.0.0.1:{stack.ports['http']}/api{path}", data, headers)
    return status, json.loads(raw)


@pytest.mark.integration
def test_every_probe_of_every_role_passes(stack):
    failing = [f"{role} {kind}" for role in ROLES for kind in KINDS if not stack.probe(role, kind).passes()]

    assert not failing


@pytest.mark.integration
def test_a_chord_runs_through_the_api_and_its_result_and_history_are_stored(stack, certificates, tls_redis):
    token = api_token(stack)

    status, started = api(stack, "POST", "/chord-tasks/", token, {"chunks": [[1, 2], [3, 4], [5]]})
    assert status == 202, started

    def finished():
        _, state = api(stack, "GET", f"/task-status/{started['task_id']}/", token)
        return state if state["state"] in ("SUCCESS", "FAILURE") else None

    state = wait_until(finished, timeout=30, interval=0.3, message="the chord's callback")
    assert state["state"] == "SUCCESS", state
    assert state["result"]["sum"] == 15
    # Beat's history recorder read the result backend's stream over TLS into TaskLog.
    wait_until(
        lambda: api(stack, "GET", "/task-overview/", token)[1]["by_state"]["SUCCESS"] >= 4,
        timeout=20,
        message="the chord's four runs in the history",
    )
    # The web's API token check read its generation from the cache's Redis, over TLS.
    cache = redis.Redis(port=tls_redis.port, db=1, **tls_redis_client_options(certificates))
    assert cache.get("django-celery-k8s:api-tokens:generation")


@pytest.mark.integration
def test_beat_reads_the_queue_lengths_and_sees_the_worker(stack):
    port = stack.roles["beat"].env["CELERY_METRICS_PORT"]

    def metrics() -> str:
        return http("GET", f"http://127.0.0.1:{port}/metrics")[1].decode()

    wait_until(lambda: 'celery_queue_length{queue_name="default"}' in metrics(), timeout=20, message="queue lengths")
    up = [line for line in metrics().splitlines() if line.startswith("celery_worker_up{") and "default@" in line]
    assert up
    assert up[0].endswith(" 1.0")


@pytest.mark.integration
def test_flower_reads_the_redis_queue_lengths(stack):
    if stack.broker != "rediss":
        pytest.skip("Flower reads RabbitMQ's queue lengths from its management API, not over amqps://")
    auth = base64.b64encode(FLOWER_AUTH.encode()).decode()

    status, body = http(
        "GET", f"http://127.0.0.1:{stack.ports['flower']}/api/queues/length", headers={"Authorization": f"Basic {auth}"}
    )

    assert status == 200, body
    assert "default" in {queue["name"] for queue in json.loads(body)["active_queues"]}


@pytest.mark.integration
def test_a_rediss_urls_own_ssl_parameters_serve_every_client_as_well(stack, certificates, tls_redis):
    if stack.broker != "rediss":
        pytest.skip("an amqps:// URL takes no ssl_* parameters")
    query = (
        f"?ssl_cert_reqs=required&ssl_ca_certs={certificates.ca}"
        f"&ssl_certfile={certificates.client_cert}&ssl_keyfile={certificates.client_key}"
    )
    env = {key: value for key, value in stack.roles["web"].env.items() if not key.startswith("TLS_")}
    env |= {"CELERY_BROKER_URL": tls_redis.url(0) + query, "RESULT_BACKEND_URL": tls_redis.url(2) + query}
    env["CACHE_URL"] = tls_redis.url(1) + query
    code = (
        "import json; from django.conf import settings; from app import api_tokens, health; "
        "from project import tls; tls.check_servers(settings.TLS_CLIENTS); "
        "print(json.dumps({'checks': health.run_checks(), 'tokens': api_tokens._cache_redis().ping()}))"
    )

    report = json.loads(stack.run("web", "manage", "shell", "-c", code, env=env).strip().splitlines()[-1])

    assert report["tokens"] is True
    assert report["checks"]["healthy"], report


@pytest.mark.integration
def test_an_untrusted_server_ends_every_role_at_start_with_the_reason(stack, certificates):
    started = {}
    for role in ROLES:
        env = {
            **stack.roles[role].env,
            "TLS_CA_FILE": str(certificates.wrong_ca),
            # Beside the running roles: ports and beat's schedule file of their own.
            "PORT": str(free_port()),
            "FLOWER_PORT": str(free_port()),
            "CELERY_METRICS_PORT": "0",
            "CELERY_BEAT_SCHEDULE_FILE": str(stack.scratch / f"{role}-wrong-ca-schedule"),
        }
        command = ["sh", str(ENTRYPOINT), *stack.roles[role].container["args"]]
        started[role] = Service(f"{role}-wrong-ca-{time.monotonic_ns()}", command, env, stack.scratch)
    try:
        for role, service in started.items():
            assert service.process.wait(timeout=30) != 0, role
            assert "certificate verify failed" in service.log(), f"{role}:\n{service.log()[-2000:]}"
            assert f"({'CELERY_BROKER_URL'})" in service.log(), role
    finally:
        for service in started.values():
            service.stop()


@pytest.mark.integration
def test_a_missing_client_certificate_ends_the_worker_at_start(stack, tls_redis):
    if stack.broker != "rediss":
        pytest.skip("once is enough: the TLS Redis asks for the certificate, the RabbitMQ node does not")
    env = {
        key: value
        for key, value in stack.roles["worker-default"].env.items()
        if key not in ("TLS_CERT_FILE", "TLS_KEY_FILE")
    }
    service = Service(
        f"worker-no-client-certificate-{time.monotonic_ns()}", ["sh", str(ENTRYPOINT), "worker"], env, stack.scratch
    )
    try:
        assert service.process.wait(timeout=30) != 0
        log = service.log()
        assert f"TLS to 127.0.0.1:{tls_redis.port}" in log, log[-2000:]
        assert "certificate required" in log or "dropped the connection after the TLS handshake" in log
        assert "with no client certificate" in log
    finally:
        service.stop()
