"""Broker, results and cache through Redis Sentinel (app/redis_sentinel.py), on a real primary, a
replica and two Sentinels on loopback (tests/sentinel_servers.py): the settings reach the
primary for all three, and a worker, beat and web keep working across a failover (the primary
SIGKILLed while tasks run) without a restart, with nothing lost by the chaos run's accounting."""

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.core.management import call_command

from project.celery import app as celery_app
from tests.chaos.run import FINAL, SHORT_LIMITS, Ledger, report, runs_by_attempt, settle, settle_seconds
from tests.conftest import FIGURES, celery_app_for, http, make_api_token, wait_until
from tests.processes import REPO_ROOT, start_worker
from tests.resources import empty_redis_db
from tests.sentinel_servers import MASTER_NAME, SentinelSet, server_binary

# In a parallel run this module stays in one process: its Redis servers and Sentinels are started once for the module.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("sentinel")]

# (path, body) the web takes while the primary fails over: every canvas of the API, at least once.
STARTS = [
    ("/api/simple-task/", {"operation": "add", "x": 2, "y": 3}),
    ("/api/chain-tasks/", {"value": 3}),
    ("/api/group-tasks/", {"pairs": [{"x": 1, "y": 2}, {"x": 3, "y": 4}]}),
    ("/api/chord-tasks/", {"chunks": [[1, 2], [3]]}),
]


@contextmanager
def running_sentinels(workdir):
    """A primary, its replica and two Sentinels, stopped after; skipped without a redis-server."""
    try:
        server_binary()
    except RuntimeError as exc:
        pytest.skip(f"no redis-server to run a Sentinel with: {exc}")
    servers = SentinelSet(workdir)
    try:
        yield servers.start()
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory):
    with running_sentinels(tmp_path_factory.mktemp("sentinel")) as servers:
        yield servers


def sentinel_env(sentinels: SentinelSet) -> dict:
    return {
        "CELERY_BROKER_URL": sentinels.url(0),
        "RESULT_BACKEND_URL": sentinels.url(1),
        "CACHE_URL": sentinels.url(2),
        "REDIS_SENTINEL_MASTER_NAME": MASTER_NAME,
    }


def test_broker_results_and_cache_reach_the_primary_through_sentinel(sentinels):
    env = {**os.environ, **sentinel_env(sentinels), "DJANGO_SECRET_KEY": "sentinel-tests-only"}
    code = (
        "from django.core.cache import cache; cache.set('sentinel-test', 'cached')\n"
        "from project.celery import app\n"
        "result = app.send_task('app.tasks.add', args=[1, 2], queue='sentinel-test')\n"
        "app.backend.store_result(result.id, 3, 'SUCCESS')\n"
        "from app import api_tokens; api_tokens._new_generation()\n"
        "channel = app.connection_for_write().default_channel\n"
        "from app.queued_records import redis_location\n"
        "same = app.backend.location == (*redis_location(channel.pool)[:3], 1)\n"
        "print(same, type(app.backend).__name__, channel.connection.__class__.__name__, result.id)\n"
    )
    run = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    same_primary, backend, transport, task_id = run.stdout.split()[-4:]

    assert (backend, transport) == ("SentinelStateBackend", "SentinelTransport")
    # The broker and the results are known to share the primary, in databases 0 and 1 (with one
    # database, a publish records its id as queued in its own transaction: app/queued_records.py).
    assert same_primary == "True"
    _host, port = sentinels.primary_address()
    primary = {db: redis.Redis(port=port, db=db) for db in (0, 1, 2)}
    assert task_id.encode() in primary[0].lindex("sentinel-test", 0)
    # The project's transport, with its outbox:
    assert any(task_id.encode() in record for record in primary[0].hvals("outbox"))
    assert json.loads(primary[1].get(f"celery-task-meta-{task_id}"))["status"] == "SUCCESS"
    assert primary[2].get(":1:sentinel-test") is not None
    assert primary[2].get("django-celery-k8s:api-tokens:generation") is not None  # the token cache's own client


@pytest.fixture
def own_sentinels(tmp_path):
    """Sentinels of one test's own: it fails the primary over."""
    with running_sentinels(tmp_path) as servers:
        yield servers


def test_a_publish_returns_once_the_replica_has_the_message_so_a_failover_right_after_loses_nothing(own_sentinels):
    sentinels = own_sentinels
    app = celery_app_for(
        sentinels.url(0),
        broker_transport="app.redis_transport:SentinelTransport",
        broker_transport_options={**settings.SENTINEL_TRANSPORT_OPTIONS, "wait_for_replicas_timeout": 10},
    )
    queue, replica = "replicated-publish-test", sentinels.replica()
    app.send_task("app.tasks.add", args=(1, 2), queue=queue)
    assert replica.llen(queue) == 1  # there as the publish returned: the replica had acknowledged it

    # The replica cut off (stopped, and its link dropped by the primary): what the primary takes
    # now never reaches it, and a publish waits. The primary dies while it waits, the replica
    # comes back and is promoted: the publish fails on the dead primary and its retry lands on
    # the new one. Without the wait, the publish would have returned at once (a 202) and its
    # message died with the old primary.
    replica_process = sentinels.processes[sentinels.replica_port]
    os.kill(replica_process.pid, signal.SIGSTOP)
    sentinels.primary().client_kill_filter(_type="replica")
    published = {}
    retry_policy = {"max_retries": 40, "interval_start": 0.25, "interval_step": 0.25, "interval_max": 0.25}

    def publish():
        published["id"] = app.send_task("app.tasks.add", args=(3, 4), queue=queue, retry_policy=retry_policy).id

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        SentinelSet.wait_until(lambda: sentinels.primary().llen(queue) == 2, "the publish to reach the primary")
        sentinels.kill_primary()
    finally:
        os.kill(replica_process.pid, signal.SIGCONT)
    sentinels.wait_for_promotion()
    publisher.join(timeout=30)
    assert not publisher.is_alive()
    messages = [json.loads(raw)["headers"]["id"] for raw in sentinels.primary().lrange(queue, 0, -1)]
    assert published["id"] in messages


@pytest.mark.timeout(240)
def test_a_primary_failover_while_tasks_run_stops_nothing_for_good_and_loses_nothing(
    sentinels, transactional_db, start_web, start_beat, service_log_dir, tmp_path, monkeypatch
):
    env = {
        **sentinel_env(sentinels),
        **SHORT_LIMITS,
        "CELERY_METRICS_PORT": "0",
        "WEB_METRICS_PORT": "0",
        "CELERY_CANARY_INTERVAL": "1",
    }
    token = make_api_token(scope="enqueue")
    monkeypatch.setattr(settings, "CELERY_CANARY_INTERVAL", 1)
    call_command("ensure_default_schedules")
    app = celery_app_for(
        sentinels.url(0),
        broker_transport="app.redis_transport:SentinelTransport",
        broker_transport_options={**settings.CELERY_BROKER_TRANSPORT_OPTIONS, **settings.SENTINEL_TRANSPORT_OPTIONS},
        result_backend=f"app.result_backend:SentinelStateBackend+{sentinels.url(1)}",
        result_backend_transport_options=settings.SENTINEL_TRANSPORT_OPTIONS,
    )
    health_dir = tmp_path / "worker-health"
    with empty_redis_db() as ledger_url:
        worker = start_worker(
            app,
            broker_url=sentinels.url(0),
            log_dir=service_log_dir,
            app_module="tests.apps.chaos_tasks",
            queues="default",  # the API's canvases; its visibility timeout is the short one
            CHAOS_LEDGER_URL=ledger_url,
            CELERY_WORKER_HEALTH_DIR=str(health_dir),
            **{name: value for name, value in env.items() if name != "CELERY_BROKER_URL"},
        )
        try:
            base = start_web(**env)
            beat = start_beat(**env)
            client = Client(base, token)
            wait_until(lambda: client.enqueue(STARTS[0]), timeout=30, message="the web to take a task")

            stop = threading.Event()
            publisher = threading.Thread(target=client.publish_until, args=(stop,), daemon=True)
            publisher.start()
            time.sleep(4)
            killed_at = sentinels.kill_primary()
            promoted_at = sentinels.wait_for_promotion()
            time.sleep(8)
            stop.set()
            publisher.join()

            # The worker's connection died with the primary: the messages it had taken and not
            # acknowledged (prefetched, or running) come back after its visibility timeout and a
            # restore sweep, as a dead worker's do; one taken and never written down, after the
            # outbox sweep. settle waits as the chaos run does, and returns once all are final.
            deadline = time.monotonic() + settle_seconds(celery_app, {"default"}, redis_broker=True)
            found = settle(client.ledger, deadline, app.backend)
            runs = runs_by_attempt(ledger_url)
            figures, passed = report(client.ledger, found, runs, [(killed_at, "primary failover")])
            if not passed:
                lost = [t for t, name in client.ledger.names.items() if found[t].get("status") not in FINAL]
                figures["where the lost tasks' messages are"] = where_on_the_broker(sentinels.primary(), lost)
            wait_until(
                lambda: canary_touched_after(health_dir, promoted_at), timeout=15, message="a canary after the failover"
            )
            ready, _ = http("GET", base + "/api/health/ready")
            restarted = [service.name for service in (worker, beat) if service.process.poll() is not None]
        finally:
            worker.stop()
    starts = sorted(at for times in runs.values() for at in times)
    pause = longest_gap(starts, killed_at - 1, promoted_at + 6)
    FIGURES["Sentinel failover: primary SIGKILLed to replica promoted (s)"] = f"{promoted_at - killed_at:.1f}"
    FIGURES["Sentinel failover: longest pause between two task starts (s)"] = f"{pause:.1f}"
    web_pause = longest_gap(client.accepted_at, killed_at - 1, promoted_at + 6)
    FIGURES["Sentinel failover: longest time the web answered no enqueue with 202 (s)"] = f"{web_pause:.1f}"

    summary = "\n".join(f"{name}: {value}" for name, value in figures.items())
    assert passed, summary
    assert figures["published"] > 100, summary
    assert not restarted, [service.log()[-3000:] for service in (worker, beat)]
    # Tasks flow again within seconds of the promotion, through the same worker, web and beat (the
    # canary: beat sent it to the new primary, the worker ran it).
    assert pause < promoted_at - killed_at + 10, (pause, figures)
    assert web_pause < promoted_at - killed_at + 5, (web_pause, client.ledger.refused)
    assert ready == 200  # web's cache, broker and result backend: all on the new primary


def where_on_the_broker(primary: redis.Redis, task_ids: list[str]) -> dict:
    """For a failed accounting: the broker keys holding each lost task's message (a list, the
    unacknowledged set, the outbox), and kombu's restore lock."""
    found = {task_id: [] for task_id in task_ids}
    for key in primary.scan_iter():
        kind = primary.type(key)
        values = primary.lrange(key, 0, -1) if kind == b"list" else primary.hvals(key) if kind == b"hash" else []
        for task_id in task_ids:
            found[task_id] += [key.decode() for value in values if task_id.encode() in value]
    lock_ttl = primary.ttl("unacked_mutex")
    unacked_ages = [
        round(time.time() - score) for _tag, score in primary.zrange("unacked_index", 0, -1, withscores=True)
    ]
    return {"lost": found, "restore lock ttl": lock_ttl, "unacknowledged ages (s)": unacked_ages}


class Client:
    """A client of the web's API: the ids of every task it was given a 202 for."""

    def __init__(self, base: str, token: str):
        self.base, self.token = base, token
        self.ledger = Ledger()
        self.accepted_at: list[float] = []

    def enqueue(self, start: tuple[str, dict]) -> bool:
        path, body = start
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            status, content = http("POST", self.base + path, json.dumps(body).encode(), headers, timeout=10)
        except OSError:
            status, content = None, b""
        if status != 202:
            self.ledger.refused += 1
            return False
        self.ledger.add([(task_id, path) for task_id in json.loads(content)["task_ids"]])
        self.accepted_at.append(time.time())
        return True

    def publish_until(self, stop: threading.Event) -> None:
        n = 0
        while not stop.wait(0.05):
            if not self.enqueue(STARTS[n % len(STARTS)]):
                time.sleep(0.1)
            n += 1


def canary_touched_after(health_dir: Path, moment: float) -> bool:
    canary = health_dir / "canary"
    return canary.exists() and canary.stat().st_mtime > moment


def longest_gap(times: list[float], start: float, end: float) -> float:
    inside = [start, *(at for at in times if start < at < end), end]
    return max(b - a for a, b in itertools.pairwise(inside))
