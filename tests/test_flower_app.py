"""Flower's start (project/flower_app.py): no inspection before a worker is online, and the first
worker inspected as soon as it is. Flower runs on a Redis of its own, so no worker of the suite
answers it."""

import json
import sys
import time

import pytest

from project.embedded import EmbeddedRedis, wait_for_port
from tests.conftest import celery_app_for, http, wait_until
from tests.processes import Service, start_worker, subprocess_env
from tests.resources import free_port

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


@pytest.fixture
def own_broker(tmp_path):
    broker = EmbeddedRedis(workdir=tmp_path).start()
    yield f"{broker.url}/0"
    broker.stop()


def test_flower_inspects_no_worker_before_one_is_online_then_the_first_at_once(own_broker, tmp_path, service_log_dir):
    port = free_port()
    command = [sys.executable, "-m", "project.flower_app", "--address=127.0.0.1", f"--port={port}"]
    # Loopback only, so its API may answer without credentials.
    env = subprocess_env(CELERY_BROKER_URL=own_broker, FLOWER_UNAUTHENTICATED_API="true")
    flower = Service(f"flower-{port}", command, env, tmp_path)
    worker = None
    try:
        wait_for_port(port, timeout=60, process=flower.process)
        wait_until(lambda: "Connected to" in flower.log(), timeout=10, message="Flower's broker connection")
        # Stock Flower inspects at once and logs each unanswered method after its 1 s timeout.
        time.sleep(3)
        assert "Inspect method" not in flower.log(), flower.log()

        worker = start_worker(celery_app_for(own_broker), broker_url=own_broker, log_dir=service_log_dir, concurrency=1)

        def inspected_workers() -> dict:
            status, body = http("GET", f"http://127.0.0.1:{port}/api/workers")
            assert status == 200, body
            workers = json.loads(body)
            # Each method's answer is cached as it arrives: done once all four are there.
            return (
                workers
                if {"stats", "active_queues", "registered", "conf"} <= set(workers.get(worker.hostname, {}))
                else None
            )

        # The cached inspection (no ?refresh=1): stock Flower has none for a worker started after it.
        workers = wait_until(inspected_workers, timeout=15, message="Flower's inspection of the new worker")
        assert set(workers) == {worker.hostname}
        assert "failed" not in flower.log(), flower.log()
    finally:
        if worker is not None:
            worker.stop()
        flower.stop()
