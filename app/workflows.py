"""Start tasks and canvases (chain, group, chord) and record every id handed to a client.

A publish that fails (broker down) raises kombu's OperationalError within the
connection timeout and retry policy set in settings; nothing is recorded then.
"""

from dataclasses import dataclass, field

from celery import chain, chord, current_app, group
from celery.result import AsyncResult, GroupResult
from celery.utils import uuid
from django.db import transaction
from kombu.exceptions import OperationalError

from app import queued_records, result_backend, routing, services, tasks


@dataclass
class Started:
    task_id: str
    task_ids: list[str] = field(default_factory=list)
    group_id: str | None = None
    report_id: int | None = None


def queued_meta(task_id: str, name: str, args, kwargs, options: dict | None = None) -> dict:
    """The "queued" record of an id handed out to a client (app/result_backend.queued_meta).
    options: the call's (queue, time_limit, soft_time_limit), when it set any."""
    options = options or {}
    return result_backend.queued_meta(
        task_id=task_id,
        task_name=name,
        args=list(args),
        kwargs=dict(kwargs),
        queue=routing.routed_queue(name, options),
        options=options,
    )


def record_queued(*calls: tuple) -> None:
    """Store "queued" for ids already published and handed out to a client, in the result
    backend (and so in the history), so their status reads queued, not unknown. calls: (task_id,
    task name, args, kwargs), and the call's options as a fifth item when it set any. With the
    Redis backend, one round trip for all; a state a fast worker already stored is left alone."""
    queued_records.record([queued_meta(*call) for call in calls], current_app.backend)


def send(task_name: str, args=(), kwargs=None, **options) -> str:
    """Publish one task under a new id, recorded as queued with its publish (app/queued_records.py);
    its id. options: apply_async's (queue, time limits...). A task this process does not know is
    sent by name, with no task's defaults."""
    task_id, kwargs = uuid(), kwargs or {}
    meta = queued_meta(task_id, task_name, args, kwargs, options)
    with queued_records.recorded_with_publish([meta], current_app.backend):
        current_app.signature(task_name).apply_async(args, kwargs, task_id=task_id, **options)
    return task_id


def start_simple(*, operation: str, x: float, y: float) -> Started:
    task = {"add": tasks.add, "multiply": tasks.multiply}[operation]
    task_id = send(task.name, [x, y])
    return Started(task_id=task_id, task_ids=[task_id])


def start_chain(*, value: int) -> Started:
    """step_1(value) -> step_2 -> step_3; the chain's id is its last step's."""
    result = chain(tasks.workflow_step_1.s(value), tasks.workflow_step_2.s(), tasks.workflow_step_3.s())()
    ids = [result.parent.parent.id, result.parent.id, result.id]
    record_queued(
        (ids[0], tasks.workflow_step_1.name, [value], {}),
        (ids[1], tasks.workflow_step_2.name, [], {}),
        (ids[2], tasks.workflow_step_3.name, [], {}),
    )
    return Started(task_id=result.id, task_ids=ids)


def start_group(*, operation: str, pairs: list[tuple[float, float]]) -> Started:
    task = {"add": tasks.add, "multiply": tasks.multiply}[operation]
    result: GroupResult = group(task.s(x, y) for x, y in pairs).apply_async()
    # Saved so GET /api/task-status/<group id>/ can find the group's members later.
    result.save()
    ids = [child.id for child in result.results]
    record_queued(*[(task_id, task.name, [x, y], {}) for task_id, (x, y) in zip(ids, pairs, strict=True)])
    return Started(task_id=result.id, task_ids=ids, group_id=result.id)


def start_chord(*, chunks: list[list[float]]) -> Started:
    """process_data_chunk for every chunk in parallel, then aggregate_results once."""
    result: AsyncResult = chord(tasks.process_data_chunk.s(i, chunk) for i, chunk in enumerate(chunks))(
        tasks.aggregate_results.s()
    )
    header_ids = [child.id for child in result.parent.results]
    record_queued(
        *[
            (task_id, tasks.process_data_chunk.name, [i, chunk], {})
            for i, (task_id, chunk) in enumerate(zip(header_ids, chunks, strict=True))
        ],
        (result.id, tasks.aggregate_results.name, [], {}),
    )
    return Started(task_id=result.id, task_ids=[*header_ids, result.id], group_id=result.parent.id)


def start_long_running(*, total_steps: int, step_seconds: float) -> Started:
    task_id = send(tasks.long_running_task.name, [total_steps, step_seconds])
    return Started(task_id=task_id, task_ids=[task_id])


def start_time_limited(*, duration: float, soft_time_limit: float | None, time_limit: float | None) -> Started:
    options = {}
    if soft_time_limit is not None:
        options["soft_time_limit"] = soft_time_limit
    if time_limit is not None:
        options["time_limit"] = time_limit
    task_id = send(tasks.time_limited_task.name, [duration], **options)
    return Started(task_id=task_id, task_ids=[task_id])


def start_retry(*, fail_probability: float, fail_times: int | None) -> Started:
    kwargs = {"fail_probability": fail_probability, "fail_times": fail_times}
    task_id = send(tasks.task_with_retry.name, [], kwargs)
    return Started(task_id=task_id, task_ids=[task_id])


def start_create_users(*, count: int, prefix: str) -> Started:
    task_id = send(tasks.create_users_batch.name, [count, prefix])
    return Started(task_id=task_id, task_ids=[task_id])


def start_report(*, report_type: str, filters: dict) -> Started:
    """Create the Report row and enqueue its task once the row is committed, so the worker
    always finds it. If the broker refuses, the row is kept, marked failed, and the error raised."""
    task_id = uuid()
    report = None
    try:
        with transaction.atomic():
            report = services.create_report(report_type=report_type, filters=filters, task_id=task_id)
            tasks.generate_report.apply_async_on_commit(args=[report.pk], task_id=task_id)
    except OperationalError as exc:
        if report is not None:
            services.fail_report(report_id=report.pk, error=f"could not enqueue: {exc}")
        raise
    record_queued((task_id, tasks.generate_report.name, [report.pk], {}))
    return Started(task_id=task_id, task_ids=[task_id], report_id=report.pk)


def send_again(*, calls: list[tuple[str, list, dict, dict]]) -> tuple[list[str], OperationalError | None]:
    """Send each (task name, args, kwargs, options) again as `send` does, under a new id.
    options: the original call's queue, time_limit and soft_time_limit (TaskLog.call_options).

    Stops at the first broker error and returns it with the ids sent before it (those are
    recorded: they are on their way)."""
    sent = []
    for name, args, kwargs, options in calls:
        try:
            sent.append(send(name, args, kwargs, **options))
        except OperationalError as exc:
            return sent, exc
    return sent, None


def revoke(*, task_ids: list[str], terminate: bool) -> None:
    """One broadcast for all ids; a worker that holds or later receives one stores it REVOKED.
    terminate: also stop a running one (SIGTERM to its pool process)."""
    current_app.control.revoke(task_ids, terminate=terminate, signal="SIGTERM")
