"""Where a task's live state is kept, and how every state it stores reaches the task history.

A task's state (queued, started, retrying, its result or error) lives in one place: the
Celery result backend. Each backend here stores a state and hands the same state to the
history (TaskLog, app/task_history.py) in one atomic step, so the history can never miss or
invent a state the backend holds:

- ``RedisStateBackend`` (the default whenever a Redis URL is the result backend): one Lua
  script per state sets the result key, publishes it to waiting clients and appends the same
  bytes to the ``celery-task-history`` stream, which the history recorder drains into TaskLog
  in batches (app/history_recorder.py). One Redis round trip per state, and no database
  round trip on the task's path. Stock Celery makes two (a GET to refuse overwriting SUCCESS,
  then SETEX + PUBLISH); the script does the same check inside Redis. ``SentinelStateBackend``
  is the same through Redis Sentinel (a sentinel:// URL).
- ``UpsertDatabaseBackend`` (RESULT_BACKEND_URL=django-db, for a deployment without Redis):
  django-celery-results' table, each state one upsert, and the TaskLog row folded in the same
  transaction. Several database round trips per state: see the README's figures.

Both also remember ids handed out to clients (``record_queued``), so "queued" is known apart
from "never heard of", answer ``stored_meta``: the stored state, or None, and keep the runs of
at-most-once tasks (``claim_run``, ``end_run``, ``runs``: app/lost_tasks.py).
"""

import datetime as dt
import json
import time
from functools import cached_property

from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django_celery_results.backends.database import DatabaseBackend
from django_celery_results.models import TaskResult

from app import queued_records, task_history
from app.models import FINISHED_STATES, TaskRun
from app.signals import RUN_STARTED_AT, RUN_STARTED_WALL, SENT_AT_HEADER

HISTORY_STREAM = "celery-task-history"

# KEYS: the task's result key, the history stream. ARGV: the encoded meta, its expiry in
# seconds (0: none), "1" to append it to the history. A stored SUCCESS is never replaced (stock
# Celery's rule against a lost worker's late write); then nothing is written and 0 returned.
STORE_STATE_LUA = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
if ARGV[2] ~= '0' then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[3] == '1' then
  redis.call('XADD', KEYS[2], '*', 'meta', ARGV[1])
end
return 1
"""

# KEYS: the history stream, then one result key per task. ARGV: the expiry (0: none), then one
# encoded PENDING meta per task. A key that exists already (a fast worker stored a state first)
# is left alone, and then nothing is appended to the history either.
RECORD_QUEUED_LUA = """
local recorded = 0
for i = 2, #KEYS do
  local stored
  if ARGV[1] ~= '0' then
    stored = redis.call('SET', KEYS[i], ARGV[i], 'NX', 'EX', ARGV[1])
  else
    stored = redis.call('SET', KEYS[i], ARGV[i], 'NX')
  end
  if stored then
    redis.call('XADD', KEYS[1], '*', 'meta', ARGV[i])
    recorded = recorded + 1
  end
end
return recorded
"""


# At-most-once runs (app/lost_tasks.py): one claim key per attempt, kept as long as results, and
# one hash of the runs going on, by "<task id>:<retries>".
RUNS_HASH = "celery-at-most-once-runs"

# KEYS: the attempt's claim key, the runs hash. ARGV: the claim's expiry in seconds, the run's
# field, the run's record. 1: claimed and recorded; 0: another run claimed it.
CLAIM_RUN_LUA = """
if redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
"""


def run_field(task_id: str, retries: int) -> str:
    return f"{task_id}:{retries}"


def _iso(timestamp: float | None) -> str | None:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).isoformat() if timestamp is not None else None


def run_meta(request, state: str) -> dict:
    """What the task's own process knows beyond Celery's extended meta: when the message was
    published (date_created), when this run started (date_started) and, once it ended, its run
    time. The worker's main process (revoke, hard time limit, lost child) knows only the first."""
    sent_at = getattr(request, SENT_AT_HEADER, None)
    started_wall = getattr(request, RUN_STARTED_WALL, None)
    extra = {"date_created": _iso(float(sent_at)) if sent_at is not None else None, "date_started": _iso(started_wall)}
    started = getattr(request, RUN_STARTED_AT, None)
    if started is not None and state in FINISHED_STATES:
        extra["runtime"] = round(time.perf_counter() - started, 6)
    extra.update(time_limits_meta(*(getattr(request, "timelimit", None) or (None, None))))
    return extra


def time_limits_meta(hard: float | None, soft: float | None) -> dict:
    """The time limits a call set (both, once published: app/time_limits.py), kept with its
    state so a re-run can send it with the same ones; none when the task's defaults apply."""
    limits = {"time_limit": hard, "soft_time_limit": soft}
    return {key: value for key, value in limits.items() if value is not None}


def queued_meta(
    *, task_id: str, task_name: str, args: list, kwargs: dict, queue: str, options: dict | None = None
) -> dict:
    """The PENDING state stored for an id handed out to a client, before any worker saw it.
    options: the call's time limits (time_limit, soft_time_limit), when it set any."""
    options = options or {}
    return {
        **time_limits_meta(options.get("time_limit"), options.get("soft_time_limit")),
        "status": states.PENDING,
        "result": None,
        "traceback": None,
        "children": [],
        "date_done": None,
        "name": task_name,
        "args": args,
        "kwargs": kwargs,
        "worker": None,
        "retries": 0,
        "queue": queue,
        "task_id": task_id,
        "date_created": timezone.now().isoformat(),
    }


class RedisStateBackend(RedisBackend):
    """Celery's Redis result backend, storing each state and its history entry in one step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.serializer != "json" or self.compression:
            # The script reads a stored state's status with Redis' own JSON decoder.
            raise ValueError("RedisStateBackend needs JSON results without compression (CELERY_RESULT_SERIALIZER)")

    @cached_property
    def _store_script(self):
        return self.client.register_script(STORE_STATE_LUA)

    @cached_property
    def _queued_script(self):
        return self.client.register_script(RECORD_QUEUED_LUA)

    def _get_result_meta(self, result, state, traceback, request, format_date=True, encode=False):
        meta = super()._get_result_meta(result, state, traceback, request, format_date, encode)
        if request is not None:
            meta.update(run_meta(request, state))
        return meta

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = task_id
        encoded = self.encode(meta)
        if len(encoded) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        history = "1" if state in task_history.RECORDED_STATES else "0"
        self.ensure(self._store, (self.get_key_for_task(task_id), encoded, int(expires or 0), history))
        return result

    def _store(self, key: str, encoded, expires: int, history: str) -> int:
        return self._store_script(keys=[key, HISTORY_STREAM], args=[encoded, expires, history])

    def on_task_call(self, producer, task_id):
        # Stock Celery subscribes to every published task's channel at once, in case the caller
        # waits for it: measured, a seventh of the web's enqueue throughput. The web never waits;
        # AsyncResult.get() subscribes itself and then reads the stored state, so nothing is missed.
        return None

    def record_queued(self, metas: list[dict]) -> int:
        """Store PENDING for ids handed out to a client, unless a state is stored already; each
        one recorded is appended to the history too. One round trip for all."""
        if not metas:
            return 0
        keys, args = self._queued_keys_and_args(metas)
        # Called in a web request, after the publish: one quick retry, never Celery's 20 seconds.
        return self.ensure(self._record_queued, (keys, args), max_retries=1, interval_start=0.2, interval_max=0.2)

    def _record_queued(self, keys: list, args: list) -> int:
        return self._queued_script(keys=keys, args=args)

    def _queued_keys_and_args(self, metas: list[dict]) -> tuple[list, list]:
        keys = [HISTORY_STREAM, *(self.get_key_for_task(meta["task_id"]) for meta in metas)]
        return keys, [int(self.expires or 0), *(self.encode(meta) for meta in metas)]

    def record_queued_command(self, metas: list[dict]) -> tuple:
        """record_queued as one command (name, *args) for another client's transaction on this
        same Redis database (app/queued_records.py). EVALSHA: a Redis that lost the script
        answers NOSCRIPT, the caller records on its own, and that loads the script again."""
        keys, args = self._queued_keys_and_args(metas)
        return ("evalsha", self._queued_script.sha, len(keys), *keys, *args)

    @cached_property
    def location(self) -> tuple:
        """Where it stores (app/queued_records.py: redis_location)."""
        return queued_records.redis_location(self.client.connection_pool)

    def stored_meta(self, task_id: str) -> dict | None:
        """The state stored for this id, or None: Celery itself answers PENDING for any id."""
        raw = self.get(self.get_key_for_task(task_id))
        return self.decode_result(raw) if raw else None

    def history_stream_client(self):
        """The Redis client and stream key the history recorder reads."""
        return self.client, HISTORY_STREAM

    @cached_property
    def _claim_script(self):
        return self.client.register_script(CLAIM_RUN_LUA)

    def claim_run(self, run: dict) -> bool:
        """Claims this attempt (run["task_id"], run["retries"]) and records it as running, in one
        round trip; False if another run claimed it first."""
        field = run_field(run["task_id"], run["retries"])
        claim = f"celery-task-run-{field.replace(':', '-')}"
        expires = int(self.expires or 86400)
        return bool(self._claim_script(keys=[claim, RUNS_HASH], args=[expires, field, json.dumps(run)]))

    def end_run(self, task_id: str, retries: int) -> None:
        """The run ended (its state is stored): no longer running. Its claim stays."""
        self.client.hdel(RUNS_HASH, run_field(task_id, retries))

    def runs(self) -> list[dict]:
        """The runs recorded as going on."""
        return [json.loads(raw) for raw in self.client.hgetall(RUNS_HASH).values()]


class SentinelStateBackend(RedisStateBackend, SentinelBackend):
    """The same on the primary a Sentinel names (a sentinel:// RESULT_BACKEND_URL): Celery's
    SentinelBackend finds it, and finds the new one after a failover."""


class UpsertDatabaseBackend(DatabaseBackend):
    """django-celery-results' database backend, storing each state in one statement, with its
    TaskLog row folded in the same transaction.

    The stock backend stores a state with get_or_create and then save: a SELECT, then an INSERT
    in its own transaction or an UPDATE, three to four round trips per state. An upsert (INSERT
    ... ON CONFLICT DO UPDATE) does the same in one; the table, the admin and every reader stay
    django-celery-results' own.
    """

    ALWAYS_UPDATED = [
        "status",
        "result",
        "traceback",
        "meta",
        "content_encoding",
        "content_type",
        "periodic_task_name",
        "task_name",
        "task_args",
        "task_kwargs",
        "worker",
        "date_done",
    ]

    def _store_result(self, task_id, result, status, traceback=None, request=None, using=None):
        content_type, content_encoding, encoded_result = self.encode_content(result)
        extra = run_meta(request, status) if request is not None else {}
        meta = {**self._get_meta_from_request(request), "children": self.current_task_children(request), **extra}
        _, _, encoded_meta = self.encode_content(meta)
        fields = {
            "task_id": task_id,
            "status": status,
            "result": encoded_result,
            "traceback": traceback,
            "meta": encoded_meta,
            "content_encoding": content_encoding,
            "content_type": content_type,
            **self._get_extended_properties(request, traceback),
        }
        update_fields = list(self.ALWAYS_UPDATED)
        if status == states.STARTED:
            fields["date_started"] = timezone.now()
            update_fields.append("date_started")
        manager = TaskResult._default_manager.db_manager(using)
        with transaction.atomic(using=manager.db):
            manager.bulk_create(
                [TaskResult(**fields)], update_conflicts=True, unique_fields=["task_id"], update_fields=update_fields
            )
            if status in task_history.RECORDED_STATES:
                history_meta = self._get_result_meta(result=result, state=status, traceback=traceback, request=request)
                task_history.apply([task_history.Entry(meta={**history_meta, **extra, "task_id": task_id})])
        return encoded_result

    def record_queued(self, metas: list[dict]) -> int:
        """A PENDING TaskResult and TaskLog row for each id handed out, unless it exists already."""
        if not metas:
            return 0
        with transaction.atomic():
            TaskResult.objects.bulk_create(
                [
                    TaskResult(
                        task_id=meta["task_id"],
                        status=states.PENDING,
                        task_name=meta["name"],
                        task_args=self.encode_content(meta["args"])[2],
                        task_kwargs=self.encode_content(meta["kwargs"])[2],
                    )
                    for meta in metas
                ],
                ignore_conflicts=True,
            )
            task_history.apply([task_history.Entry(meta=meta) for meta in metas])
        return len(metas)

    def stored_meta(self, task_id: str) -> dict | None:
        if not TaskResult.objects.filter(task_id=task_id).exists():
            return None
        meta = self._get_task_meta_for(task_id)
        # The same names as the Redis backend's meta.
        meta.setdefault("name", meta.get("task_name"))
        return meta

    def history_stream_client(self):
        return None

    def claim_run(self, run: dict) -> bool:
        """Claims this attempt with a TaskRun row (one INSERT in its own transaction); False if
        the row exists: another run claimed it."""
        try:
            with transaction.atomic():
                TaskRun.objects.create(
                    task_id=run["task_id"],
                    retries=run["retries"],
                    task_name=run["name"],
                    worker=run["hostname"],
                    worker_pid=run["pid"],
                    started_at=dt.datetime.fromtimestamp(run["started"], tz=dt.UTC),
                )
        except IntegrityError:
            return False
        return True

    def end_run(self, task_id: str, retries: int) -> None:
        TaskRun.objects.filter(task_id=task_id, retries=retries).update(running=False)

    def runs(self) -> list[dict]:
        # Claims older than the results are of no more use: dropped here, where beat looks.
        if self.expires:
            TaskRun.objects.filter(started_at__lt=timezone.now() - dt.timedelta(seconds=self.expires)).delete()
        return [
            {
                "task_id": run.task_id,
                "retries": run.retries,
                "name": run.task_name,
                "hostname": run.worker,
                "pid": run.worker_pid,
                "started": run.started_at.timestamp(),
            }
            for run in TaskRun.objects.filter(running=True)
        ]
