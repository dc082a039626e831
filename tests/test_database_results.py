"""RESULT_BACKEND_URL=django-db, a deployment without Redis (RabbitMQ alone): task states in the
database, and TaskLog written in the same transaction as each state, with a real worker."""

import os

import pytest
from celery.result import AsyncResult

from app import workflows
from app.models import TaskLog, TaskState
from tests.conftest import RABBITMQ_GROUP, celery_app_for
from tests.processes import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

DATABASE_BACKEND = "app.result_backend:UpsertDatabaseBackend"


@pytest.fixture(params=[pytest.param("rabbitmq", marks=RABBITMQ_GROUP), "redis"])
def database_results_app(request, service_log_dir):
    if request.param == "rabbitmq":
        broker_url = os.environ.get("RABBITMQ_URL")
        if not broker_url:
            pytest.skip("RABBITMQ_URL not set: the RabbitMQ broker tests need a running RabbitMQ")
    else:
        broker_url = request.getfixturevalue("redis_url")
    app = celery_app_for(broker_url, result_backend=DATABASE_BACKEND, broker_transport_options={})
    worker = start_worker(app, broker_url=broker_url, log_dir=service_log_dir, RESULT_BACKEND_URL="django-db")
    app.set_current()
    try:
        yield app
    finally:
        from project.celery import app as project_app

        project_app.set_current()
        worker.stop()


def test_a_chord_a_chain_and_a_failure_keep_their_states_and_history_in_the_database(database_results_app):
    app = database_results_app
    chord = workflows.start_chord(chunks=[[1, 2], [3]])
    chain = workflows.start_chain(value=3)
    failing = app.send_task("app.tasks.aggregate_results", args=[[{"bad": 1}]])

    assert AsyncResult(chord.task_id, app=app).get(timeout=60)["sum"] == 6
    assert AsyncResult(chain.task_id, app=app).get(timeout=60) == {"input": 16, "result": 256}
    with pytest.raises(KeyError):
        AsyncResult(failing.id, app=app).get(timeout=60)

    # Written with each state, in its transaction: no recorder runs here.
    logs = {log.task_id: log for log in TaskLog.objects.filter(task_id__in=[*chord.task_ids, *chain.task_ids])}
    assert {log.state for log in logs.values()} == {TaskState.SUCCESS}
    assert len(logs) == len(chord.task_ids) + len(chain.task_ids)
    assert TaskLog.objects.get(task_id=failing.id).exception.startswith("KeyError")
    # What the status API reads, in a process configured with this backend.
    assert app.backend.stored_meta(chain.task_id)["result"] == {"input": 16, "result": 256}
    assert app.backend.stored_meta(failing.id)["status"] == "FAILURE"
    assert app.backend.stored_meta("never-handed-out") is None
