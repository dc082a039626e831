"""The history recorder: drains the Redis history stream into TaskLog, in batches, off every
task's path.

The Redis result backend appends each stored state to the ``celery-task-history`` stream in
the same script that stores it (app/result_backend.py). The recorder reads the stream as a
member of the consumer group ``task-history``: an entry it has read stays in the group's
pending list until the batch holding it is committed to the database, and only then is it
acknowledged and deleted. So:

- a recorder killed at any point loses nothing: on restart it first re-reads what it had
  read but not acknowledged; a recorder that never comes back (another pod name) has its
  pending entries claimed by a live one after ``claim_idle`` seconds;
- an entry applied twice changes nothing (app/task_history.py's rules);
- while no recorder runs, the stream keeps growing (the backlog gauge and the
  CeleryTaskHistoryBacklog alert watch it), and nothing is lost.

Beat runs one in a thread (``start``, from ``beat_init``); ``manage.py record_task_history``
runs one in the foreground.
"""

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass

import redis
from django.db import connections

from app import task_history
from app.monitoring import metrics

logger = logging.getLogger(__name__)

GROUP = "task-history"
MAX_BACKOFF = 30.0


@dataclass
class RecorderSettings:
    batch_size: int = 500
    block_seconds: float = 1.0
    linger_seconds: float = 0.0
    claim_idle_seconds: float = 30.0


def start(app) -> threading.Thread | None:
    """In beat, once: a recorder thread, if the result backend keeps a history stream."""
    from django.conf import settings

    if not settings.TASK_HISTORY_RECORDER:
        logger.info("Task history recorder off in this process (TASK_HISTORY_RECORDER=false)")
        return None
    stream = app.backend.history_stream_client() if hasattr(app.backend, "history_stream_client") else None
    if stream is None:
        logger.info("The result backend writes TaskLog itself: no history recorder needed")
        return None
    client, key = stream
    recorder = HistoryRecorder(client=client, stream=key, settings=recorder_settings())
    thread = threading.Thread(target=recorder.run, name="history-recorder", daemon=True)
    thread.start()
    return thread


def recorder_settings() -> RecorderSettings:
    from django.conf import settings

    return RecorderSettings(
        batch_size=settings.TASK_HISTORY_BATCH_SIZE,
        block_seconds=settings.TASK_HISTORY_BLOCK_SECONDS,
        linger_seconds=settings.TASK_HISTORY_LINGER_SECONDS,
        claim_idle_seconds=settings.TASK_HISTORY_CLAIM_IDLE_SECONDS,
    )


class HistoryRecorder:
    """Reads the history stream in batches and folds them into TaskLog (one transaction each)."""

    def __init__(self, *, client, stream: str, settings: RecorderSettings, consumer: str | None = None):
        self.client = client
        self.stream = stream
        self.settings = settings
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self.stopping = threading.Event()
        # Re-read our own unacknowledged entries first: after a restart under the same name, or
        # after a batch whose database write failed.
        self._own_pending = True
        self._next_claim = 0.0
        self._next_backlog_report = 0.0

    # --- The loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Record until stop(); errors are logged and retried with backoff, never raised."""
        try:
            self._run()
        finally:
            connections.close_all()  # this thread's own: nothing else would ever close them

    def _run(self) -> None:
        delay = 1.0
        logger.info("Recording task history from stream %s as %s", self.stream, self.consumer)
        while not self.stopping.is_set():
            try:
                self.step()
                if delay > 1.0:
                    logger.info("Recording task history again")
                delay = 1.0
            except Exception as exc:
                self._own_pending = True  # what this batch read stays pending: read it again
                logger.warning("Cannot record task history (%r); retrying in %.0f s", exc, delay)
                self._report_backlog()
                self.stopping.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            self._report_backlog()

    def stop(self) -> None:
        self.stopping.set()

    def step(self) -> int:
        """Read one batch, write it to TaskLog, acknowledge it; returns the entries handled."""
        batch = self.read_batch()
        if not batch:
            return 0
        entries, undecodable = [], 0
        for entry_id, fields in batch:
            meta = _decode(fields)
            if meta is None:
                undecodable += 1
                logger.error("Skipping history entry %s: not a task state (%r)", entry_id, fields)
                continue
            entries.append(task_history.Entry(meta=meta, position=task_history.stream_position(entry_id)))
        written = task_history.apply(entries)
        ids = [entry_id for entry_id, _ in batch]
        with self.client.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            pipe.execute()
        self._observe(entries, written, undecodable)
        return len(batch)

    def read_batch(self) -> list[tuple[bytes, dict | None]]:
        self._ensure_group()
        count = self.settings.batch_size
        if self._own_pending:
            batch = self._read(count, "0", block=None)
            if batch:
                logger.info("Reading again %d history entries read before and not yet written", len(batch))
                return batch
            self._own_pending = False
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self.settings.claim_idle_seconds / 2
            claimed = self._claim_idle(count)
            if claimed:
                return claimed
        batch = self._read(count, ">", block=int(self.settings.block_seconds * 1000))
        if batch and len(batch) < count and self.settings.linger_seconds:
            # A few entries now and more on their way: let them gather, one transaction for all.
            # Measured, a batch of one cost the recorder ten times the CPU per task of a full one.
            self.stopping.wait(self.settings.linger_seconds)
            batch += self._read(count - len(batch), ">", block=None)
        return batch

    # --- Redis ------------------------------------------------------------------------------

    def _ensure_group(self) -> None:
        if getattr(self, "_group_ready", False):
            return
        try:
            # From the stream's start: states stored before any recorder ran are recorded too.
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _read(self, count: int, last_id: str, block: int | None) -> list:
        try:
            response = self.client.xreadgroup(GROUP, self.consumer, {self.stream: last_id}, count=count, block=block)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted (a flushed Redis): start again
                self._group_ready = False
            raise
        if not response:
            return []
        _stream, entries = response[0]
        return entries

    def _claim_idle(self, count: int) -> list:
        """Entries another recorder read and never acknowledged within claim_idle (it died)."""
        idle_ms = int(self.settings.claim_idle_seconds * 1000)
        response = self.client.xautoclaim(self.stream, GROUP, self.consumer, idle_ms, "0-0", count=count)
        claimed = response[1] if response else []
        if claimed:
            logger.warning("Claimed %d history entries a stopped recorder had read", len(claimed))
        return claimed

    # --- Metrics ----------------------------------------------------------------------------

    def _observe(self, entries: list, written: int, undecodable: int) -> None:
        try:
            m = metrics.history()
            m.entries.inc(len(entries))
            m.rows.inc(written)
            if undecodable:
                m.undecodable.inc(undecodable)
            now_ms = time.time() * 1000
            for entry in entries:
                # The entry id's first part is the millisecond Redis stored the state.
                m.lag.observe(max(0.0, (now_ms - entry.position / 1_000_000) / 1000))
            m.last_batch.set(time.time())
        except Exception:
            logger.exception("Metrics update failed in the history recorder")

    def _report_backlog(self) -> None:
        """celery_task_history_backlog, at most once a second."""
        now = time.monotonic()
        if now < self._next_backlog_report:
            return
        self._next_backlog_report = now + 1.0
        try:
            metrics.history().backlog.set(backlog(self.client, self.stream))
        except Exception as exc:
            logger.debug("Cannot read the history backlog: %r", exc)


def backlog(client, stream: str) -> int:
    """States stored but not yet written to TaskLog: unread plus read and unacknowledged. The
    recorder deletes each entry once its batch is written, so that is the stream's length."""
    return int(client.xlen(stream))


def _decode(fields: dict | None) -> dict | None:
    if not fields:
        return None
    raw = fields.get(b"meta", fields.get("meta"))
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("task_id") else None
