"""TaskLog folded from stored states (app/task_history.py), against the real database."""

import datetime as dt

import pytest
from django.utils import timezone

from app import task_history
from app.models import TaskLog, TaskState
from app.task_history import Entry

pytestmark = pytest.mark.django_db

T0 = dt.datetime(2026, 11, 1, 12, 0, 0, tzinfo=dt.UTC)


def iso(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).isoformat()


def meta(task_id: str, status: str, **fields) -> dict:
    """A stored state as the Redis backend stores it (Celery's extended meta plus run times)."""
    return {
        "task_id": task_id,
        "status": status,
        "result": None,
        "traceback": None,
        "date_done": None,
        "name": "app.tasks.add",
        "args": [1, 2],
        "kwargs": {},
        "worker": "w1@host",
        "retries": 0,
        "queue": "default",
        "date_created": iso(0),
        **fields,
    }


def queued(task_id: str, **fields) -> dict:
    return meta(task_id, "PENDING", worker=None, **fields)


def test_a_task_is_one_row_from_queued_to_success():
    task_history.apply(
        [
            Entry(queued("t1"), position=1),
            Entry(meta("t1", "STARTED", date_started=iso(1)), position=2),
            Entry(meta("t1", "SUCCESS", result=3, date_started=iso(1), date_done=iso(1.5), runtime=0.5), position=3),
        ]
    )

    log = TaskLog.objects.get(task_id="t1")
    assert (log.state, log.result, log.worker, log.queue, log.args) == (
        TaskState.SUCCESS,
        3,
        "w1@host",
        "default",
        [1, 2],
    )
    assert (log.created_at, log.started_at, log.finished_at) == (
        T0,
        T0 + dt.timedelta(seconds=1),
        T0 + dt.timedelta(seconds=1.5),
    )
    assert log.duration == dt.timedelta(seconds=0.5)
    assert (log.version, log.recorded_at is not None) == (3, True)


def test_each_batch_is_one_transaction_over_any_number_of_tasks(django_assert_max_num_queries):
    entries = [Entry(meta(f"b{i}", "SUCCESS", result=i, date_done=iso(1)), position=i + 1) for i in range(300)]

    # BEGIN, SELECT ... FOR UPDATE, the upsert and COMMIT, whatever the batch size.
    with django_assert_max_num_queries(4):
        assert task_history.apply(entries) == 300

    assert TaskLog.objects.filter(state=TaskState.SUCCESS).count() == 300


def test_a_queued_record_arriving_after_the_worker_never_changes_its_state():
    task_history.apply([Entry(meta("t2", "SUCCESS", result=3, date_done=iso(2), date_created=iso(0.5)), position=5)])
    task_history.apply([Entry(queued("t2", date_created=iso(0)), position=6)])

    log = TaskLog.objects.get(task_id="t2")
    assert (log.state, log.result) == (TaskState.SUCCESS, 3)
    assert log.created_at == T0  # the earliest known: when the API handed the id out


def test_a_batch_applied_again_changes_nothing():
    batch = [
        Entry(meta("t3", "STARTED", date_started=iso(1)), position=10),
        Entry(meta("t3", "SUCCESS", result=1, date_done=iso(2), runtime=1.0), position=11),
    ]
    task_history.apply(batch)
    before = TaskLog.objects.get(task_id="t3")

    assert task_history.apply(batch) == 0

    after = TaskLog.objects.get(task_id="t3")
    assert (after.state, after.recorded_at, after.version) == (before.state, before.recorded_at, before.version)


def test_an_older_entry_claimed_late_from_a_dead_recorder_does_not_move_the_row_back():
    task_history.apply([Entry(meta("t4", "RETRY", result={"exc_type": "TransientError", "exc_message": ["x"]}), 20)])
    task_history.apply([Entry(meta("t4", "STARTED", retries=1, date_started=iso(3)), position=22)])

    task_history.apply([Entry(meta("t4", "RETRY", result={"exc_type": "TransientError", "exc_message": ["x"]}), 20)])

    assert TaskLog.objects.get(task_id="t4").state == TaskState.STARTED


def test_success_is_final():
    task_history.apply([Entry(meta("t5", "SUCCESS", result=1, date_done=iso(1)), position=30)])
    task_history.apply(
        [Entry(meta("t5", "FAILURE", result={"exc_type": "WorkerLostError", "exc_message": []}), position=31)]
    )

    assert TaskLog.objects.get(task_id="t5").state == TaskState.SUCCESS


def test_retries_keep_the_reason_then_a_new_attempt_clears_it():
    reason = {"exc_type": "TransientError", "exc_message": ["flaky"], "exc_module": "app.tasks"}
    task_history.apply([Entry(meta("t6", "RETRY", result=reason, traceback="Traceback ..."), position=40)])
    log = TaskLog.objects.get(task_id="t6")
    assert (log.state, log.exception, log.traceback) == (TaskState.RETRY, "TransientError: flaky", "Traceback ...")

    task_history.apply([Entry(meta("t6", "STARTED", retries=1, date_started=iso(4)), position=41)])

    log = TaskLog.objects.get(task_id="t6")
    assert (log.state, log.retries, log.exception, log.traceback) == (TaskState.STARTED, 1, "", "")


def test_a_failure_stored_without_a_run_clock_takes_its_duration_from_the_start():
    # The worker's main process stores a hard time limit's failure: it has no run clock.
    task_history.apply([Entry(meta("t7", "STARTED", date_started=iso(0)), position=50)])
    failure = {"exc_type": "TimeLimitExceeded", "exc_message": ["TimeLimitExceeded(2.0,)"]}
    task_history.apply([Entry(meta("t7", "FAILURE", result=failure, date_done=iso(30)), position=51)])

    log = TaskLog.objects.get(task_id="t7")
    assert log.state == TaskState.FAILURE
    assert log.exception == "TimeLimitExceeded: TimeLimitExceeded(2.0,)"
    assert log.duration == dt.timedelta(seconds=30)


def test_revoked_before_it_ever_ran_is_a_row():
    revoked = {"exc_type": "TaskRevokedError", "exc_message": ["revoked"]}
    task_history.apply([Entry(meta("t8", "REVOKED", result=revoked, date_done=iso(1)), position=60)])

    log = TaskLog.objects.get(task_id="t8")
    assert (log.state, log.task_name, log.exception) == (
        TaskState.REVOKED,
        "app.tasks.add",
        "TaskRevokedError: revoked",
    )


def test_huge_results_are_summarised_and_long_tracebacks_trimmed():
    task_history.apply(
        [
            Entry(meta("t9", "SUCCESS", result="x" * 100_000, date_done=iso(1)), position=70),
            Entry(
                meta(
                    "t10",
                    "FAILURE",
                    result={"exc_type": "ValueError", "exc_message": ["v"]},
                    traceback="y" * 50_000 + "END",
                ),
                position=71,
            ),
        ]
    )

    assert TaskLog.objects.get(task_id="t9").result == {"truncated": True, "json_chars": 100_002}
    traceback = TaskLog.objects.get(task_id="t10").traceback
    assert traceback.startswith("...(truncated)")
    assert traceback.endswith("END")
    assert len(traceback) < 10_100


def test_states_the_history_does_not_keep_are_skipped():
    task_history.apply([Entry(meta("t11", "PROGRESS", result={"current": 1}), position=80)])

    assert not TaskLog.objects.filter(task_id="t11").exists()


def test_entries_of_the_database_backend_apply_in_order_without_positions():
    task_history.apply([Entry(meta("t12", "STARTED", date_started=iso(1)))])
    task_history.apply([Entry(meta("t12", "SUCCESS", result=5, date_done=iso(2), runtime=1.0))])

    log = TaskLog.objects.get(task_id="t12")
    assert (log.state, log.result, log.version) == (TaskState.SUCCESS, 5, None)


def test_a_state_from_a_producer_without_the_sent_at_header_still_gets_a_creation_time():
    before = timezone.now()
    task_history.apply([Entry(meta("t13", "SUCCESS", result=1, date_created=None, date_done=None), position=90)])

    assert TaskLog.objects.get(task_id="t13").created_at >= before


def test_stream_positions_order_like_the_stream_ids():
    assert task_history.stream_position(b"1700000000000-0") < task_history.stream_position("1700000000000-1")
    assert task_history.stream_position("1700000000000-999") < task_history.stream_position("1700000000001-0")
