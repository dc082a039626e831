"""Worker metrics: exact sums over a real prefork worker (multiprocess mode), and metrics that
can never fail a task."""

import time
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app import tasks
from app.models import TaskLog
from app.monitoring import metrics
from project.celery import app as celery_app
from tests.conftest import celery_app_for, wait_until
from tests.processes import start_worker
from tests.resources import free_port


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, metric: str, /, **labels) -> float:
    """Sum of the samples of `metric` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == metric and wanted <= lab)


@pytest.fixture
def metrics_worker(redis_url, django_db_blocker, service_log_dir, tmp_path):
    app = celery_app_for(redis_url)
    port = free_port()
    multiproc_dir = tmp_path / "multiproc"
    with django_db_blocker.unblock():
        service = start_worker(
            app,
            broker_url=redis_url,
            log_dir=service_log_dir,
            name="metrics",
            CELERY_METRICS_PORT=port,
            PROMETHEUS_MULTIPROC_BASE_DIR=multiproc_dir,
        )
    try:
        app.set_current()
        yield app, port, service.hostname, multiproc_dir, service
    finally:
        celery_app.set_current()
        service.stop()


pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.integration
def test_every_registered_task_has_its_series_at_zero_before_its_first_run(metrics_worker):
    _app, port, _hostname, _multiproc_dir, _service = metrics_worker
    samples = scrape(port)
    # Never run in this test: a series at 0 on its routed queue, so increase() sees a first failure.
    report = {"name": "app.tasks.generate_report", "queue_name": "long"}
    for metric in ("celery_task_received_total", "celery_task_succeeded_total", "celery_task_revoked_total"):
        assert samples[(metric, frozenset(report.items()))] == 0
    assert samples[("celery_task_rejected_total", frozenset({"name": "unknown", "queue_name": "default"}.items()))] == 0
    assert not any(
        name == "celery_task_succeeded_total" and ("name", "celery.chord_unlock") in labels for name, labels in samples
    )


@pytest.mark.integration
def test_prefork_sums_are_exact(metrics_worker, task_history):
    _app, port, hostname, multiproc_dir, service = metrics_worker
    sent_before = {
        name: REGISTRY.get_sample_value("celery_task_sent_total", {"name": name, "queue_name": "default"}) or 0.0
        for name in ("app.tasks.add", "app.tasks.aggregate_results", "app.tasks.task_with_retry")
    }

    ids = [tasks.add.apply_async((i, 1)).id for i in range(120)]
    # A chunk summary without its keys: KeyError in the task.
    ids += [tasks.aggregate_results.apply_async(([{}],)).id for _ in range(30)]
    ids += [tasks.task_with_retry.apply_async(kwargs={"fail_times": 1}).id for _ in range(5)]

    def finished():
        return TaskLog.objects.filter(task_id__in=ids, state__in=["SUCCESS", "FAILURE"]).count() == len(ids)

    wait_until(finished, timeout=120, interval=0.5, message=f"155 tasks done:\n{service.log()[-2000:]}")
    # Postrun runs after the state is written: give the last metric updates a moment.
    wait_until(
        lambda: value(scrape(port), "celery_task_runtime_count") == 160,
        timeout=10,
        message=f"all runs counted: {value(scrape(port), 'celery_task_runtime_count')}\n{service.log()[-3000:]}",
    )
    samples = scrape(port)

    add, agg, retry = "app.tasks.add", "app.tasks.aggregate_results", "app.tasks.task_with_retry"
    assert value(samples, "celery_task_succeeded_total", name=add, queue_name="default") == 120
    assert value(samples, "celery_task_succeeded_total", name=retry, queue_name="default") == 5
    assert value(samples, "celery_task_succeeded_total") == 125
    assert value(samples, "celery_task_failed_total", name=agg, queue_name="default", exception="KeyError") == 30
    assert value(samples, "celery_task_failed_total") == 30
    assert value(samples, "celery_task_retried_total", name=retry, queue_name="default") == 5
    assert value(samples, "celery_task_retried_total") == 5
    assert value(samples, "celery_task_started_total", queue_name="default") == 120 + 30 + 10
    assert value(samples, "celery_task_received_total", queue_name="default") == 120 + 30 + 10
    assert value(samples, "celery_task_runtime_count", name=add, queue_name="default") == 120
    assert value(samples, "celery_task_runtime_count", name=agg, queue_name="default") == 30
    assert value(samples, "celery_task_runtime_count", name=retry, queue_name="default") == 10
    assert value(samples, "celery_task_queue_wait_time_count", queue_name="default") == 160
    # Every label value seen is bounded: names from registered tasks, the configured queues; and
    # only the tasks run here counted anything (the other registered tasks' series sit at 0).
    for (name, labels), sample_value in samples.items():
        labels = dict(labels)
        if name.startswith("celery_task_"):
            assert labels.get("queue_name") in {"default", "long"}, (name, labels)
            assert labels.get("name") in {*celery_app.tasks, metrics.UNKNOWN}, (name, labels)
            if sample_value and not name.endswith("_sum"):
                assert labels.get("name") in {add, agg, retry}, (name, labels)
    # Up/down comes from beat alone (app/monitoring/cluster_metrics.py): a worker cannot report its own death.
    assert not any(name == "celery_worker_up" for name, _labels in samples)
    assert value(samples, "celery_worker_tasks_active", hostname=hostname) == 0
    # Several processes wrote: the sums above are over the pool children, not one of them.
    assert len(list((multiproc_dir / "worker").glob("counter_*.db"))) >= 2

    # Publisher side, in this process: the retries' republishes happen in the worker.
    for name, published in ((add, 120), (agg, 30), (retry, 5)):
        after = REGISTRY.get_sample_value("celery_task_sent_total", {"name": name, "queue_name": "default"})
        assert after - sent_before[name] == published

    # A countdown is deliberate, not waiting: the wait is measured from the ETA.
    delayed = tasks.multiply.apply_async((2, 3), countdown=2)
    wait_until(
        lambda: TaskLog.objects.filter(task_id=delayed.id, state="SUCCESS").exists(), timeout=30, message="countdown"
    )
    wait_until(
        lambda: value(scrape(port), "celery_task_queue_wait_time_count", name="app.tasks.multiply") == 1,
        message="the delayed task's wait observed",
    )
    # Published 2 s before it was due, run as soon as it was due: the wait is near 0, not 2 s.
    assert value(scrape(port), "celery_task_queue_wait_time_sum", name="app.tasks.multiply") < 1.0


def test_metrics_failure_never_fails_a_task(monkeypatch, caplog):
    def broken():
        raise RuntimeError("metrics down")

    monkeypatch.setattr(metrics, "get", broken)
    result = tasks.add.apply(args=(2, 3))
    assert result.successful()
    assert result.result == 5
    assert "Metrics update failed" in caplog.text


def test_unregistered_names_are_unknown():
    assert metrics.task_name("app.tasks.add") == "app.tasks.add"
    assert metrics.task_name("evil.task.with.id.123") == metrics.UNKNOWN
    assert metrics.task_name(None) == metrics.UNKNOWN


@pytest.mark.integration
def test_a_task_killed_at_its_hard_time_limit_counts_one_failure_and_no_success(metrics_worker, task_history):
    _app, port, hostname, _multiproc_dir, service = metrics_worker
    name = "app.tasks.time_limited_task"
    # The clean-up after the soft limit outlasts the hard limit: the worker kills the child.
    result = tasks.time_limited_task.apply_async(
        args=[30], kwargs={"cleanup_seconds": 30}, soft_time_limit=0.5, time_limit=1
    )

    wait_until(
        lambda: TaskLog.objects.filter(task_id=result.id, state="FAILURE").exists(),
        timeout=30,
        message=f"FAILURE at the hard limit:\n{service.log()[-2000:]}",
    )
    wait_until(
        lambda: value(scrape(port), "celery_worker_tasks_active", hostname=hostname) == 0,
        message="the killed run no longer active",
    )
    time.sleep(0.5)  # a second count, if any, comes from the same failure handling
    samples = scrape(port)
    assert value(samples, "celery_task_failed_total", name=name, exception="TimeLimitExceeded") == 1
    assert value(samples, "celery_task_failed_total") == 1
    assert value(samples, "celery_task_succeeded_total") == 0
    assert value(samples, "celery_task_started_total", name=name) == 1
