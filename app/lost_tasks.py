"""At-most-once tasks whose worker died while running them, stored as FAILURE (WorkerLostError),
so that no state stays STARTED, or queued, for ever.

An at-most-once task is acknowledged when it starts. If its worker dies while it runs (a SIGKILL,
an OOM kill of the whole pod), no broker gives it back and no process of that worker is left to
store how it ended: its state, and its TaskLog row, would stay STARTED (or queued, for a task
that stores no STARTED). Beat follows the workers' events (app/cluster_metrics.py) and keeps, per
worker, the tasks it started and has not finished. Once a worker has sent nothing for
LOST_TASK_AFTER seconds, each at-most-once task it was running whose stored state is not final
is stored as FAILURE, which reaches the history like any other state. At-least-once tasks are
left alone: the broker gives them back (app/redelivery.py).

Events over Redis are published, not queued: a task started while beat was not listening is not
known here, and stays as it was.
"""

import logging
import time
from collections import OrderedDict

from billiard.exceptions import WorkerLostError
from celery import states

logger = logging.getLogger(__name__)

# Task names by id, between the task-received and task-started events.
NAMES_KEPT = 10_000
FINISHED_EVENTS = ("task-succeeded", "task-failed", "task-retried", "task-revoked", "task-rejected")


class RunningTasks:
    def __init__(self, app, *, lost_after: float, clock=time.monotonic):
        self.app = app
        self.lost_after = lost_after
        self.clock = clock
        self.names: OrderedDict[str, str] = OrderedDict()
        self.running: dict[str, dict[str, str]] = {}  # hostname -> {task id: task name}
        self.last_seen: dict[str, float] = {}

    def event(self, event: dict) -> None:
        """Any worker or task event: the worker is alive; task events move its running set."""
        hostname, kind = event.get("hostname"), event.get("type", "")
        if not hostname:
            return
        self.last_seen[hostname] = self.clock()
        task_id = event.get("uuid")
        if kind == "task-received" and task_id:
            self.names[task_id] = event.get("name") or ""
            if len(self.names) > NAMES_KEPT:
                self.names.popitem(last=False)
        elif kind == "task-started" and task_id:
            self.running.setdefault(hostname, {})[task_id] = self.names.pop(task_id, "")
        elif kind in FINISHED_EVENTS and task_id:
            self.running.get(hostname, {}).pop(task_id, None)
        elif kind == "worker-offline":
            # A clean shutdown: its tasks finished first (a warm shutdown), or were given back.
            self.running.pop(hostname, None)
            self.last_seen.pop(hostname, None)

    def sweep(self) -> int:
        """Stores FAILURE for the at-most-once tasks of workers silent for lost_after; the count."""
        now, failed = self.clock(), 0
        for hostname, seen in list(self.last_seen.items()):
            if now - seen < self.lost_after:
                continue
            for task_id, name in self.running.pop(hostname, {}).items():
                failed += self._fail_if_lost(hostname, task_id, name)
            del self.last_seen[hostname]
        return failed

    def _fail_if_lost(self, hostname: str, task_id: str, name: str) -> int:
        task = self.app.tasks.get(name)
        acks_late = task.acks_late if task is not None else self.app.conf.task_acks_late
        if acks_late:
            return 0  # given back by the broker, and run again
        try:
            meta = self.app.backend.stored_meta(task_id)
            if meta is not None and meta.get("status") in states.READY_STATES:
                return 0
            error = WorkerLostError(f"Worker {hostname} stopped (no event for {self.lost_after:g} s) while running it")
            self.app.backend.mark_as_failure(task_id, error)
        except Exception:
            logger.exception("Could not store FAILURE for task %s[%s] of the lost worker %s", name, task_id, hostname)
            return 0
        logger.warning("Task %s[%s] was running on %s, which stopped: stored as FAILURE", name, task_id, hostname)
        return 1
