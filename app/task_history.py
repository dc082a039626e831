"""TaskLog, the durable task history, folded from the states the result backend stores.

Every state a result backend stores is one history entry: the Celery result meta it stored
(status, result or error, name, args, worker, queue, retries, dates), plus the id handed out
to a client while still queued (status PENDING). ``apply`` is the one code path that writes
TaskLog: the history recorder calls it with batches read from the Redis stream
(app/history_recorder.py), the database result backend with each state in the transaction
that stores it (app/result_backend.py).

Rules, so that a batch applied twice (a recorder killed before it acknowledged) or out of
turn (a batch claimed from a dead recorder) changes nothing:
- an entry at or before the row's stream position (``version``) is old news;
- a SUCCESS is final: nothing but a later queued record touches it (the backend refuses to
  overwrite a stored SUCCESS too);
- a queued record (PENDING) never changes the state of a row a worker wrote; it only fills
  what the row lacks, and the earliest created_at wins.
"""

import datetime as dt
import json
import logging
from dataclasses import dataclass

from celery import states
from django.db import transaction
from django.utils import timezone

from app.models import TaskLog, TaskState, format_exception, truncate_traceback

logger = logging.getLogger(__name__)

# The states the history keeps. PROGRESS and other custom states stay in the result backend.
RECORDED_STATES = frozenset({states.STARTED, states.RETRY, states.SUCCESS, states.FAILURE, states.REVOKED})

RESULT_MAX_JSON_CHARS = 64_000

# Every column a fold may change.
FOLDED_FIELDS = [
    "task_name",
    "state",
    "args",
    "kwargs",
    "result",
    "exception",
    "traceback",
    "worker",
    "queue",
    "retries",
    "created_at",
    "started_at",
    "finished_at",
    "duration",
    "time_limit",
    "soft_time_limit",
    "version",
    "recorded_at",
]

TIME_LIMITS = ("time_limit", "soft_time_limit")


@dataclass(frozen=True)
class Entry:
    """One stored state: the result meta, and its position in the history stream (None when
    applied in the transaction that stored it)."""

    meta: dict
    position: int | None = None


def stream_position(entry_id: str | bytes) -> int:
    """A stream entry id ("<milliseconds>-<sequence>") as one comparable integer."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds) * 1_000_000 + int(sequence or 0)


def apply(entries: list[Entry]) -> int:
    """Fold `entries` (in the order they were stored) into TaskLog; returns the rows written.

    One transaction: the existing rows are read locked, merged in Python, and written back in
    one upsert, so a batch of any size costs four round trips."""
    by_task: dict[str, list[Entry]] = {}
    for entry in entries:
        task_id = entry.meta.get("task_id")
        if task_id:
            by_task.setdefault(str(task_id), []).append(entry)
    if not by_task:
        return 0
    with transaction.atomic():
        existing = {
            row["task_id"]: row
            for row in TaskLog.objects.select_for_update()
            .filter(task_id__in=list(by_task))
            .values("task_id", *FOLDED_FIELDS)
        }
        now = timezone.now()
        rows = []
        for task_id, task_entries in by_task.items():
            before = existing.get(task_id)
            row = dict(before) if before else None
            for entry in task_entries:
                row = fold(row, entry)
            if row is not None and row != before:
                row["recorded_at"] = now
                rows.append(TaskLog(**row))
        if rows:
            TaskLog.objects.bulk_create(
                rows, update_conflicts=True, unique_fields=["task_id"], update_fields=FOLDED_FIELDS
            )
    return len(rows)


def fold(row: dict | None, entry: Entry) -> dict | None:
    """The TaskLog row (as a dict of fields) after one more stored state."""
    meta, position = entry.meta, entry.position
    if row is not None and position is not None and row.get("version") is not None and position <= row["version"]:
        return row
    state = meta.get("status")
    if state != states.PENDING and state not in RECORDED_STATES:
        return row
    if row is None:
        row = _new_row(meta)
    if position is not None:
        row["version"] = max(position, row.get("version") or 0)
    created = _parse(meta.get("date_created"))
    if created is not None and (row["created_at"] is None or created < row["created_at"]):
        row["created_at"] = created
    if row["created_at"] is None:  # published without the sent_at header (another producer)
        row["created_at"] = _parse(meta.get("date_started")) or _parse(meta.get("date_done")) or timezone.now()
    if state == states.PENDING:
        _fill_missing(row, meta)
        return row
    if row["state"] == TaskState.SUCCESS:
        return row
    _take_run_fields(row, meta)
    row["state"] = state
    if state == states.STARTED:
        row.update(
            started_at=_parse(meta.get("date_started")) or row["started_at"] or timezone.now(),
            finished_at=None,
            duration=None,
            result=None,
            exception="",
            traceback="",
        )
        return row
    if state == states.RETRY:
        row.update(exception=_exception_text(meta.get("result")), traceback=_traceback(meta), finished_at=None)
        return row
    # A final state: SUCCESS, FAILURE or REVOKED.
    row["started_at"] = _parse(meta.get("date_started")) or row["started_at"]
    row["finished_at"] = _parse(meta.get("date_done")) or timezone.now()
    runtime = meta.get("runtime")
    if runtime is not None:
        row["duration"] = dt.timedelta(seconds=float(runtime))
    elif row["started_at"] is not None:
        # Stored by the worker's main process (hard time limit, lost child): no run clock there.
        row["duration"] = max(row["finished_at"] - row["started_at"], dt.timedelta(0))
    if state == states.SUCCESS:
        row.update(result=storable_result(meta.get("result")), exception="", traceback="")
    else:
        row.update(result=None, exception=_exception_text(meta.get("result")), traceback=_traceback(meta))
    return row


def _new_row(meta: dict) -> dict:
    return {
        "task_id": str(meta["task_id"]),
        "task_name": meta.get("name") or "",
        "state": TaskState.PENDING,
        "args": _listed(meta.get("args")),
        "kwargs": _mapped(meta.get("kwargs")),
        "result": None,
        "exception": "",
        "traceback": "",
        "worker": "",
        "queue": meta.get("queue") or "",
        "retries": 0,
        "created_at": None,
        "started_at": None,
        "finished_at": None,
        "duration": None,
        "time_limit": None,
        "soft_time_limit": None,
        "version": None,
        "recorded_at": None,
    }


def _fill_missing(row: dict, meta: dict) -> None:
    if not row["task_name"]:
        row["task_name"] = meta.get("name") or ""
    if not row["queue"]:
        row["queue"] = meta.get("queue") or ""
    if not row["args"] and meta.get("args"):
        row["args"] = _listed(meta["args"])
    if not row["kwargs"] and meta.get("kwargs"):
        row["kwargs"] = _mapped(meta["kwargs"])
    for limit in TIME_LIMITS:
        if row[limit] is None and meta.get(limit) is not None:
            row[limit] = float(meta[limit])


def _take_run_fields(row: dict, meta: dict) -> None:
    """Name, call, worker, queue, retries and time limits as the storing process saw them."""
    if meta.get("name"):
        row["task_name"] = meta["name"]
    if meta.get("args") is not None:
        row["args"] = _listed(meta["args"])
    if meta.get("kwargs") is not None:
        row["kwargs"] = _mapped(meta["kwargs"])
    if meta.get("worker"):
        row["worker"] = meta["worker"]
    if meta.get("queue"):
        row["queue"] = meta["queue"]
    if meta.get("retries") is not None:
        row["retries"] = int(meta["retries"])
    for limit in TIME_LIMITS:
        if meta.get(limit) is not None:
            row[limit] = float(meta[limit])


def _listed(value) -> list:
    return list(value) if isinstance(value, list | tuple) else []


def _mapped(value) -> dict:
    return dict(value) if isinstance(value, dict) else {}


def _parse(value) -> dt.datetime | None:
    if not value:
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        try:
            parsed = dt.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _exception_text(result) -> str:
    """'ExcType: message' from the exception a backend stored (Celery's exc_type/exc_message)."""
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = message[0] if len(message) == 1 else ", ".join(map(str, message))
        return f"{result['exc_type']}: {message}" if message not in (None, "") else str(result["exc_type"])
    if isinstance(result, BaseException | str):
        return format_exception(result)
    return "" if result is None else str(result)


def _traceback(meta: dict) -> str:
    return truncate_traceback(meta.get("traceback") or "")


def storable_result(result):
    """Results are JSON already (JSON-only serializer); very large ones are summarised."""
    try:
        size = len(json.dumps(result))
    except (TypeError, ValueError):
        return {"unserializable": repr(result)[:200]}
    if size > RESULT_MAX_JSON_CHARS:
        return {"truncated": True, "json_chars": size}
    return result
