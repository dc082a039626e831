"""The chart's probes, run as the kubelet would run them, against live processes and real faults.

The chart is rendered with its minimal values; each role (web, the long worker pool, beat,
Flower) is started through the image's entrypoint with its container's environment from the
rendered manifests (ConfigMap, Secret, env), pointed at a Redis and a PostgreSQL of this module
only, which the tests stop and start again. Exec probes run as commands with that environment
(its /tmp paths moved to a scratch folder); httpGet probes are HTTP requests to the container
port they name.
"""

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import redis

from project.embedded import wait_for_port
from tests.chart_roles import (
    CANARY_INTERVAL,
    CANARY_STALE_AFTER,
    ENTRYPOINT,
    KINDS,
    WORKER_STUCK_AFTER,
    Probe,
    Stack,
    moved_to,
)
from tests.conftest import celery_app_for, http, wait_until
from tests.deploy.conftest import containers, deep_merge, labels, load_values, of_kind, render_chart
from tests.deploy.test_chart_invariants import effective_env
from tests.processes import Service
from tests.resources import free_port

# In a parallel run this module stays in one process: the chart's roles are started once for the module.
pytestmark = pytest.mark.xdist_group("probes")

# --- Unit: the readiness rule ------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"connected": True, "consuming": True, "busy": False, "canary_age": 5.0}, "free"),
        ({"connected": True, "consuming": True, "busy": False, "canary_age": 50.0}, None),
        ({"connected": True, "consuming": True, "busy": False, "canary_age": None}, None),
        ({"connected": True, "consuming": True, "busy": True, "canary_age": 50.0}, "busy"),
        ({"connected": True, "consuming": False, "busy": False, "canary_age": 1.0}, None),
        ({"connected": False, "consuming": True, "busy": True, "canary_age": 1.0}, None),
    ],
)
def test_worker_is_ready_when_consuming_and_its_canary_is_fresh_or_every_slot_is_busy(state, expected):
    from app.monitoring.worker_health import readiness

    assert readiness(**state, stale_after=30) == expected


def test_without_a_canary_schedule_a_consuming_worker_is_ready():
    from app.monitoring.worker_health import readiness

    assert readiness(connected=True, consuming=True, busy=False, canary_age=None, stale_after=0) == "free"


# --- The rendered probes ----------------------------------------------------------------


ROLES = ("web", "worker-long", "beat", "flower")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("probes"))
    try:
        # The worker's metrics are read by a test; the other roles' servers stay off.
        stack.roles["worker-long"].env["CELERY_METRICS_PORT"] = str(free_port())
        stack.migrate()
        stack.start(ROLES)
        yield stack
    finally:
        stack.stop()


def first_change(probe: Probe, *, to: bool, within: float, also_passing: tuple[Probe, ...] = ()) -> float:
    """Seconds until `probe` first gives `to`; every probe in `also_passing` must keep passing."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if probe.passes() == to:
            return time.monotonic() - started
        for other in also_passing:
            assert other.passes(), f"{other.role} {other.kind} failed meanwhile"
        time.sleep(0.5)
    raise AssertionError(f"{probe.role} {probe.kind} still {'failing' if to else 'passing'} after {within} s")


# --- Healthy -----------------------------------------------------------------------------


@pytest.mark.integration
def test_every_probe_passes_on_a_healthy_system(stack):
    failing = [f"{role} {kind}" for role in ROLES for kind in KINDS if not stack.probe(role, kind).passes()]
    assert not failing


@pytest.mark.integration
def test_probes_are_cheap_commands_and_unauthenticated_urls(stack):
    worker = stack.roles["worker-long"].container
    for kind in KINDS:
        command = " ".join(worker[kind]["exec"]["command"])
        # No Django import, no broker round trip.
        assert "celery" not in command
        assert "python" not in command
    flower = stack.probe("flower", "livenessProbe")
    assert "Authorization" not in str(flower.spec)
    # Flower's authentication is on: its pages refuse the same client without credentials.
    assert http("GET", f"http://127.0.0.1:{stack.ports['flower']}/")[0] == 401


@pytest.mark.integration
def test_web_readiness_runs_the_health_checks_and_liveness_touches_nothing(stack):
    ready = stack.probe("web", "readinessProbe").spec["httpGet"]["path"]
    live = stack.probe("web", "livenessProbe").spec["httpGet"]["path"]
    headers = {"Host": "localhost"}
    status, body = http("GET", f"http://127.0.0.1:{stack.ports['http']}{ready}", headers=headers)
    assert status == 200
    assert b'"database"' in body
    assert b'"broker"' in body
    status, body = http("GET", f"http://127.0.0.1:{stack.ports['http']}{live}", headers=headers)
    assert status == 200
    assert b"database" not in body


@pytest.mark.integration
def test_the_canary_ran_on_the_worker_and_is_recorded(stack):
    canary = Path(stack.roles["worker-long"].env["CELERY_WORKER_HEALTH_DIR"]) / "canary"

    def succeeded_lines():
        lines = stack.roles["worker-long"].service.log().splitlines()
        return [
            line
            for line in lines
            if '"task_finished"' in line and "app.tasks.health_check" in line and '"SUCCESS"' in line
        ]

    wait_until(succeeded_lines, timeout=CANARY_INTERVAL * 5, message="a health_check canary on the long worker")
    assert time.time() - canary.stat().st_mtime < CANARY_INTERVAL * 3
    # Set in the pool process, served (multiprocess mode "max") by the main process.
    port = stack.roles["worker-long"].env["CELERY_METRICS_PORT"]
    _, page = http("GET", f"http://127.0.0.1:{port}/metrics")
    sample = 'django_celery_k8s_health_check_last_success_timestamp_seconds{queue_name="long"} '
    (line,) = [line for line in page.decode().splitlines() if line.startswith(sample)]
    assert time.time() - float(line.split()[-1]) < CANARY_INTERVAL * 3


def test_web_readiness_reuses_its_checks_for_the_cache_interval(monkeypatch, settings):
    from app import health

    runs = []
    monkeypatch.setattr(health, "run_checks", lambda: runs.append(1) or {"healthy": True, "checks": {}})
    monkeypatch.setattr(health, "_cached", None)
    monkeypatch.setattr(health, "_running", None)
    settings.HEALTH_READY_CACHE_SECONDS = 0.5
    for _ in range(20):
        assert health.run_checks_cached()["healthy"]
    assert len(runs) == 1
    time.sleep(0.6)
    health.run_checks_cached()
    assert len(runs) == 2


def test_web_readiness_waits_for_hanging_checks_only_up_to_its_timeout(monkeypatch, settings):
    from app import health

    def hanging_checks():
        time.sleep(1.5)
        return {"healthy": True, "checks": {}}

    monkeypatch.setattr(health, "run_checks", hanging_checks)
    monkeypatch.setattr(health, "_cached", None)
    monkeypatch.setattr(health, "_running", None)
    settings.HEALTH_READY_TIMEOUT_SECONDS = 0.3
    started = time.monotonic()
    first, second = health.run_checks_cached(), health.run_checks_cached()  # one round, both wait
    assert not first["healthy"]
    assert not second["healthy"]
    assert time.monotonic() - started < 1.0
    time.sleep(1.5)
    assert health.run_checks_cached()["healthy"]  # the round finished meanwhile


@pytest.mark.integration
def test_flower_probes_pass_under_a_url_prefix_with_authentication_on(stack):
    docs = render_chart(deep_merge(load_values("minimal-values.yaml"), {"flower": {"urlPrefix": "ops/flower"}}))
    (workload,) = [w for w in of_kind(docs, "Deployment") if labels(w).get("app.kubernetes.io/component") == "flower"]
    container = containers(workload, init=False)[0]
    port = free_port()
    env = {**moved_to(stack.scratch, effective_env(docs, container)), **stack.overrides, "FLOWER_PORT": str(port)}
    assert env["FLOWER_URL_PREFIX"] == "ops/flower"
    service = Service(f"flower-prefix-{port}", ["sh", str(ENTRYPOINT), *container["args"]], env, stack.scratch)
    try:
        wait_for_port(port, timeout=60, process=service.process)
        probes = [Probe("flower", kind, container[kind], env, {"flower": port}) for kind in KINDS]
        assert {probe.spec["httpGet"]["path"] for probe in probes} == {"/ops/flower/healthcheck"}
        wait_until(
            lambda: all(probe.passes() for probe in probes), timeout=30, message="Flower's probes under a prefix"
        )
        assert http("GET", f"http://127.0.0.1:{port}/ops/flower/")[0] == 401
    finally:
        service.stop()


# --- Faults ------------------------------------------------------------------------------


@pytest.mark.integration
def test_broker_outage_makes_worker_and_web_unready_keeps_them_alive_and_both_recover(stack):
    worker_ready, web_ready = stack.probe("worker-long", "readinessProbe"), stack.probe("web", "readinessProbe")
    alive = (stack.probe("worker-long", "livenessProbe"), stack.probe("web", "livenessProbe"))
    stack.redis.stop()
    try:
        first_change(worker_ready, to=False, within=worker_ready.window + 15, also_passing=alive)
        first_change(web_ready, to=False, within=web_ready.window + 10, also_passing=alive)
        # Longer than the worker's liveness file may age (30 s): liveness holds through the outage.
        deadline = time.monotonic() + 35
        while time.monotonic() < deadline:
            assert all(probe.passes() for probe in alive), "a liveness probe failed during the broker outage"
            time.sleep(2)
    finally:
        stack.redis.start()
    first_change(worker_ready, to=True, within=90, also_passing=alive)
    first_change(web_ready, to=True, within=30, also_passing=alive)


@pytest.mark.integration
def test_database_outage_makes_web_unready_until_it_returns(stack):
    web_ready, web_alive = stack.probe("web", "readinessProbe"), stack.probe("web", "livenessProbe")
    stack.postgres.stop()
    try:
        first_change(web_ready, to=False, within=web_ready.window + 10, also_passing=(web_alive,))
    finally:
        stack.postgres.start()
    first_change(web_ready, to=True, within=30, also_passing=(web_alive,))


def postgres_processes(stack: Stack) -> list[int]:
    """The postmaster (first line of postmaster.pid) and its children."""
    import psutil

    postmaster = psutil.Process(int((stack.postgres.datadir / "postmaster.pid").read_text().split()[0]))
    return [postmaster.pid, *(child.pid for child in postmaster.children(recursive=True))]


@pytest.mark.integration
def test_a_hanging_database_makes_web_unready_without_tying_up_its_workers(stack):
    web_ready, web_alive = stack.probe("web", "readinessProbe"), stack.probe("web", "livenessProbe")
    # SIGSTOP: connections open but nothing answers, like a database behind a dead network path.
    processes = postgres_processes(stack)
    for pid in processes:
        os.kill(pid, signal.SIGSTOP)
    try:
        first_change(web_ready, to=False, within=web_ready.window + 10, also_passing=(web_alive,))
        # Checks stuck on the database never hold a gunicorn worker past the readiness timeout.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert web_alive.passes(), "web liveness failed while the database hung"
            assert not web_ready.passes()
            time.sleep(1)
    finally:
        for pid in processes:
            os.kill(pid, signal.SIGCONT)
    first_change(web_ready, to=True, within=30, also_passing=(web_alive,))


def start_long_task(stack: Stack, seconds: int) -> None:
    """A long task on the long worker's only slot, running once this returns."""
    worker = stack.roles["worker-long"]
    task_id = (
        celery_app_for(worker.env["CELERY_BROKER_URL"])
        .send_task("app.tasks.long_running_task", args=[seconds, 1.0], queue="long")
        .id
    )
    # Canaries that queued up meanwhile may run first: wait for this very task to start (it stores
    # STARTED in the stack's result backend, its broker's Redis).
    results = redis.Redis.from_url(worker.env["CELERY_BROKER_URL"])

    def started() -> bool:
        raw = results.get(f"celery-task-meta-{task_id}")
        return bool(raw) and json.loads(raw)["status"] in ("STARTED", "PROGRESS")

    wait_until(started, timeout=30, message=f"long task {task_id} started\n{stack.log_tail('worker-long')}")


@pytest.mark.integration
def test_a_worker_busy_with_a_long_task_on_its_only_slot_stays_alive_and_ready(stack):
    start_long_task(stack, CANARY_STALE_AFTER * 3)
    ready_file = Path(stack.roles["worker-long"].env["CELERY_WORKER_HEALTH_DIR"]) / "ready"
    try:
        wait_until(lambda: ready_file.exists() and ready_file.read_text() == "busy", timeout=30, message="worker busy")
    except AssertionError as error:
        state = ready_file.read_text() if ready_file.exists() else "no ready file"
        raise AssertionError(f"{error} ({state})\n{stack.log_tail('worker-long')}") from None
    alive, ready = stack.probe("worker-long", "livenessProbe"), stack.probe("worker-long", "readinessProbe")
    # Longer than the canary may be stale: no canary runs while the only slot is busy.
    deadline = time.monotonic() + CANARY_STALE_AFTER * 2
    while time.monotonic() < deadline:
        assert alive.passes()
        assert ready.passes()
        time.sleep(1)
    wait_until(lambda: ready_file.exists() and ready_file.read_text() == "free", timeout=CANARY_STALE_AFTER * 3)


@pytest.mark.integration
def test_beat_stopped_ticking_fails_beat_liveness_and_starves_the_worker_canary(stack):
    beat = stack.roles["beat"].service.process
    beat_alive = stack.probe("beat", "livenessProbe")
    worker_ready, worker_alive = (
        stack.probe("worker-long", "readinessProbe"),
        stack.probe("worker-long", "livenessProbe"),
    )
    os.kill(beat.pid, signal.SIGSTOP)
    try:
        # No canary while beat is stopped: the free worker is no longer ready, yet alive.
        first_change(
            worker_ready, to=False, within=CANARY_STALE_AFTER + worker_ready.window + 15, also_passing=(worker_alive,)
        )
        # The heartbeat file may be 60 s old; the kubelet then needs failureThreshold more runs.
        elapsed = first_change(beat_alive, to=False, within=75)
        assert elapsed <= 75
    finally:
        os.kill(beat.pid, signal.SIGCONT)
    first_change(beat_alive, to=True, within=15)
    first_change(worker_ready, to=True, within=CANARY_INTERVAL * 4 + worker_ready.window)


@pytest.mark.integration
def test_a_stopped_worker_main_loop_fails_liveness_within_its_window(stack):
    worker = stack.roles["worker-long"].service.process
    alive = stack.probe("worker-long", "livenessProbe")
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        # The alive file may be 30 s old before the probe fails.
        first_change(alive, to=False, within=30 + alive.spec["periodSeconds"] + 5)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    first_change(alive, to=True, within=30)


@pytest.mark.integration
def test_a_worker_connected_but_not_consuming_turns_unready_then_fails_liveness(stack):
    """celery#10205: a worker stays connected and answers pings but takes nothing. Here its
    consumer is cancelled through remote control; readiness fails within its window, liveness
    once WORKER_STUCK_AFTER has passed and the alive file aged past the probe's 30 s, so the
    kubelet would restart it. Consuming again, it is alive and ready again."""
    worker = stack.roles["worker-long"]
    control = celery_app_for(worker.env["CELERY_BROKER_URL"]).control
    destination = [f"{worker.env['CELERY_WORKER_NAME']}@{socket.gethostname()}"]
    alive, ready = stack.probe("worker-long", "livenessProbe"), stack.probe("worker-long", "readinessProbe")
    assert control.cancel_consumer("long", destination=destination, reply=True), "no reply to cancel_consumer"
    try:
        first_change(ready, to=False, within=ready.window + 10, also_passing=(alive,))
        # Still alive for WORKER_STUCK_AFTER, then the file ages past the probe's 30 s.
        seconds = first_change(alive, to=False, within=WORKER_STUCK_AFTER + 30 + alive.spec["periodSeconds"] + 10)
        assert seconds >= 30, f"liveness failed after {seconds:.0f} s: before the alive file could be 30 s old"
        assert "not consuming from all of its queues" in stack.log_tail("worker-long")
    finally:
        control.add_consumer("long", destination=destination, reply=True)
    first_change(alive, to=True, within=30)
    first_change(ready, to=True, within=CANARY_INTERVAL * 4 + ready.window)


@pytest.mark.integration
def test_a_warm_shutdown_keeps_the_worker_alive_while_its_task_finishes(stack):
    worker = stack.roles["worker-long"]
    start_long_task(stack, 45)
    ready_file = Path(worker.env["CELERY_WORKER_HEALTH_DIR"]) / "ready"
    wait_until(lambda: ready_file.exists() and ready_file.read_text() == "busy", timeout=30, message="worker busy")
    alive, ready = stack.probe("worker-long", "livenessProbe"), stack.probe("worker-long", "readinessProbe")
    worker.service.process.send_signal(signal.SIGTERM)  # warm shutdown: the running task finishes
    first_change(ready, to=False, within=ready.window + 15, also_passing=(alive,))
    # Longer than the alive file may age with the event loop stopped.
    deadline = time.monotonic() + 35
    while time.monotonic() < deadline:
        assert worker.service.process.poll() is None, "the worker did not wait for its task"
        assert alive.passes(), "liveness failed during the warm shutdown"
        time.sleep(2)
    assert worker.service.process.wait(timeout=30) == 0
