"""The chart's roles run as their containers would: each started through the image's entrypoint
with its container's environment from the rendered manifests (ConfigMap, Secret, env), its /tmp
paths moved to a scratch folder, pointed at services of the test's own; and its probes, run as the
kubelet runs them (exec probes as commands with that environment, httpGet probes as requests)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from project.embedded import EmbeddedPostgres, EmbeddedRedis, wait_for_port
from tests.conftest import http, wait_until
from tests.deploy.conftest import containers, labels, load_values, of_kind, render_chart
from tests.deploy.test_chart_invariants import effective_env
from tests.processes import REPO_ROOT, Service, require_process_marker
from tests.resources import free_port

ENTRYPOINT = REPO_ROOT / "deploy" / "image" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent
FLOWER_AUTH = "probe:probe-password"
CANARY_INTERVAL = 3  # seconds; the chart's default is 60
CANARY_STALE_AFTER = 9
WORKER_STUCK_AFTER = 10  # seconds connected without consuming before liveness is let go; default 120
KINDS = ("startupProbe", "livenessProbe", "readinessProbe")


@dataclass
class Probe:
    role: str
    kind: str  # livenessProbe, readinessProbe, startupProbe
    spec: dict
    env: dict
    ports: dict  # container port name -> local port

    @property
    def window(self) -> float:
        """Seconds the kubelet needs to act on a failure that has begun: failureThreshold runs."""
        return self.spec.get("periodSeconds", 10) * self.spec.get("failureThreshold", 3)

    def passes(self) -> bool:
        timeout = self.spec.get("timeoutSeconds", 1)
        if "exec" in self.spec:
            try:
                run = subprocess.run(self.spec["exec"]["command"], env=self.env, capture_output=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return run.returncode == 0
        get = self.spec["httpGet"]
        port = self.ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
        try:
            status, _ = http("GET", f"http://127.0.0.1:{port}{get['path']}", headers=headers, timeout=timeout)
        except OSError:  # refused, reset or timed out: a failure for the kubelet too
            return False
        return 200 <= status < 400


def moved_to(scratch: Path, env: dict) -> dict:
    """The container's /tmp (an emptyDir) is the scratch folder here."""
    return {k: str(scratch) + v[len("/tmp") :] if v.startswith("/tmp/") or v == "/tmp" else v for k, v in env.items()}


@dataclass
class Role:
    name: str
    container: dict
    env: dict
    service: Service | None = None

    def probe(self, kind: str, ports: dict) -> Probe:
        return Probe(self.name, kind, self.container[kind], self.env, ports)


class Stack:
    """The chart's roles, each with the environment the chart gives it, on a Redis and a PostgreSQL of
    their own: embedded ones (stopped with the stack), or `services` (broker and cache URLs, TLS
    files...) and `postgres` given by the caller. `values`: the chart's (its minimal values by default)."""

    def __init__(
        self,
        scratch: Path,
        *,
        values: dict | None = None,
        services: dict | None = None,
        postgres: EmbeddedPostgres | None = None,
    ):
        require_process_marker("the chart's roles")
        self.scratch = scratch
        self.redis = None if services else EmbeddedRedis(workdir=scratch).start()
        self.postgres_dir = None
        if postgres is None:
            # As root, pgserver runs PostgreSQL (and its pg_ctl stop and start) as its own user, who
            # must reach the data folder: pytest's scratch folders are private to root.
            self.postgres_dir = Path(tempfile.mkdtemp(prefix="probe-tests-pg-"))
            self.postgres_dir.chmod(0o755)
            postgres = EmbeddedPostgres(self.postgres_dir / "pg" / "data").start()
        self.postgres = postgres
        self.docs = render_chart(values if values is not None else load_values("minimal-values.yaml"))
        self.ports = {"http": free_port(), "flower": free_port()}
        self.roles: dict[str, Role] = {}
        self.overrides = overrides = {
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "HOME": str(scratch),
            "APP_RUNTIME_DIR": str(scratch),
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": self.postgres.url,
            **(services or {"CELERY_BROKER_URL": f"{self.redis.url}/0", "CACHE_URL": f"{self.redis.url}/1"}),
            "DJANGO_SECRET_KEY": "probe-tests-only",
            "DJANGO_STATIC_ROOT": str(scratch / "static"),
            "PROMETHEUS_MULTIPROC_BASE_DIR": str(scratch / "prometheus"),
            "FLOWER_BASIC_AUTH": FLOWER_AUTH,
            # Other tests and programs on this machine use the chart's fixed ports.
            "CELERY_METRICS_PORT": "0",
            "WEB_METRICS_PORT": "0",
            "FLOWER_METRICS_PORT": "0",
            "PORT": str(self.ports["http"]),
            "FLOWER_PORT": str(self.ports["flower"]),
            "FLOWER_ADDRESS": "127.0.0.1",
            # Two cores shared with other work: one gunicorn worker is enough here.
            "WEB_CONCURRENCY": "1",
            # A canary every few seconds, so its rules show within a test.
            "CELERY_CANARY_INTERVAL": str(CANARY_INTERVAL),
            "CELERY_CANARY_STALE_AFTER": str(CANARY_STALE_AFTER),
            "CELERY_WORKER_STUCK_AFTER": str(WORKER_STUCK_AFTER),
        }
        for workload in of_kind(self.docs, "Deployment", "Job"):
            component = labels(workload).get("app.kubernetes.io/component")
            pool = labels(workload).get("app.kubernetes.io/worker-pool")
            name = {"worker": f"worker-{pool}"}.get(component, component)
            container = containers(workload, init=False)[0]
            self.roles[name] = Role(
                name, container, {**moved_to(scratch, effective_env(self.docs, container)), **overrides}
            )
        (scratch / "prometheus").mkdir(exist_ok=True)
        (scratch / "static").mkdir(exist_ok=True)

    def run_role(self, name: str) -> Service:
        role = self.roles[name]
        args = role.container.get("args") or []
        role.service = Service(f"{name}-{uuid.uuid4().hex[:6]}", ["sh", str(ENTRYPOINT), *args], role.env, self.scratch)
        return role.service

    def run(self, role: str, *args: str, env: dict | None = None) -> str:
        """The image's entrypoint with `args` and the role's environment (or `env`), run to its end;
        its output."""
        run = subprocess.run(
            ["sh", str(ENTRYPOINT), *args],
            env=env if env is not None else self.roles[role].env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    def migrate(self) -> None:
        """The migrate role, run to its end."""
        self.run("migrate", *self.roles["migrate"].container["args"])

    def start(self, roles: tuple[str, ...]) -> None:
        """Start the roles, then wait as the kubelet does: startup first, then every probe passes."""
        for role in roles:
            self.run_role(role)
        if "web" in roles:
            wait_for_port(self.ports["http"], timeout=60, process=self.roles["web"].service.process)
        if "flower" in roles:
            wait_for_port(self.ports["flower"], timeout=60, process=self.roles["flower"].service.process)
        for role in roles:
            for kind in KINDS:
                probe = self.probe(role, kind)
                wait_until(probe.passes, timeout=90, interval=0.5, message=f"{role} {kind}\n{self.log_tail(role)}")

    def probe(self, role: str, kind: str) -> Probe:
        return self.roles[role].probe(kind, self.ports)

    def log_tail(self, role: str) -> str:
        service = self.roles[role].service
        return service.log()[-3000:] if service else ""

    def stop(self) -> None:
        for role in self.roles.values():
            if role.service is not None:
                if role.service.process.poll() is None:
                    os.kill(role.service.process.pid, signal.SIGCONT)  # in case a test left it stopped
                role.service.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.postgres_dir is not None:
            self.postgres.stop()
            shutil.rmtree(self.postgres_dir, ignore_errors=True)
