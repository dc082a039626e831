"""At-most-once runs: each attempt runs once, and one whose worker died is stored as FAILURE.

An at-most-once task is acknowledged when it starts, so no broker gives it back if its worker
dies while it runs (a SIGKILL, an OOM kill of the whole pod), and no process of that worker is
left to store how it ended: its state, and its TaskLog row, would stay STARTED (or queued, for
a task that stores no STARTED) for ever. And an acknowledgement can itself be lost (the broker
restarts before it arrives): on Redis the message then comes back after the visibility timeout,
and would run a second time.

So the process that runs an attempt first claims it in the result backend (``start_run``: one
round trip on Redis, SET NX of a claim key and HSET of a record of the run; a TaskRun row with
the database backend). A second delivery of the same attempt finds the claim and is not run.
The record says which worker (hostname and main process id) runs it; it is removed once the
run's state is stored (``end_run``, from the task class's after_return).

Beat (app/monitoring/cluster_metrics.py) follows the workers' events and sweeps the records
(``LostRuns``): a run whose worker has sent nothing for LOST_TASK_AFTER seconds, or whose
hostname now belongs to another process (the worker was restarted), is stored as FAILURE
(WorkerLostError) unless its state is already final, and that reaches the history like any
other state. Beat only judges while it has been listening for LOST_TASK_AFTER: a worker it could
not hear is not a dead one. Workers send a heartbeat every 2 s, task events or not.
At-least-once tasks record nothing: the broker gives them back (app/redelivery.py).
"""

import logging
import os
import time

from billiard.exceptions import WorkerLostError
from celery import states

logger = logging.getLogger(__name__)

# Set on the request of a run that claimed its attempt: its record is removed when it ends.
RUN_CLAIMED = "at_most_once_run_claimed"
# The worker's main process id, set at worker_init (the pool processes inherit it); its events
# carry the same id.
worker_pid: int | None = None
# The states an attempt ends in: final, or its retry published.
ENDED_STATES = states.READY_STATES | {states.RETRY}
# Seconds between two sweeps of the records.
SWEEP_INTERVAL = 5.0


def start_run(task, request) -> bool:
    """True for the first run of this attempt of an at-most-once task, now recorded as running
    on this worker. False if another run claimed it, or if the claim cannot be made (at most
    once: better not run than run twice). A result backend without run records: True."""
    backend = task.backend
    if not hasattr(backend, "claim_run"):
        return True
    run = {
        "task_id": request.id,
        "retries": request.retries or 0,
        "name": task.name,
        "hostname": request.hostname or "",
        "pid": worker_pid or os.getpid(),
        "started": time.time(),
    }
    try:
        claimed = backend.claim_run(run)
    except Exception as exc:
        logger.warning("Could not claim the run of at-most-once task %s[%s] (%r): not run", task.name, request.id, exc)
        return False
    if claimed:
        setattr(request, RUN_CLAIMED, True)
    return claimed


def end_run(task, task_id: str) -> None:
    """After the run's state is stored: its record goes. A record left by an error here is
    removed by beat's sweep, which finds the final state."""
    request = task.request
    if getattr(request, RUN_CLAIMED, False):
        task.backend.end_run(task_id, request.retries or 0)


class LostRuns:
    """Beat's side: the workers it hears from, and the sweep of the runs they recorded."""

    def __init__(self, backend, *, lost_after: float, clock=time.monotonic, wall_clock=time.time):
        self.backend = backend
        self.lost_after = lost_after
        self.clock, self.wall_clock = clock, wall_clock
        self.workers: dict[str, tuple[float, int | None]] = {}  # hostname -> (last heard, main process id)
        self.listening_since: float | None = None
        self.next_sweep = 0.0

    def listening(self) -> None:
        """Connected to the worker events."""
        if self.listening_since is None:
            self.listening_since = self.clock()

    def deaf(self) -> None:
        """The worker events are lost: nothing can be judged until they have been heard again
        for lost_after."""
        self.listening_since = None

    def event(self, event: dict) -> None:
        """Any worker or task event: its worker was alive then, as that process."""
        hostname = event.get("hostname")
        if not hostname:
            return
        if event.get("type") == "worker-offline":
            # A clean shutdown: its runs ended first (a warm shutdown) or never will (a cold one).
            self.workers[hostname] = (float("-inf"), event.get("pid"))
        else:
            self.workers[hostname] = (self.clock(), event.get("pid"))

    def sweep(self) -> int:
        """Every SWEEP_INTERVAL: stores FAILURE for the recorded runs of lost workers, removes the
        records of runs whose state is final; the count stored."""
        now = self.clock()
        if now < self.next_sweep or self.listening_since is None or now - self.listening_since < self.lost_after:
            return 0
        self.next_sweep = now + SWEEP_INTERVAL
        if not hasattr(self.backend, "runs"):
            return 0
        try:
            runs = self.backend.runs()
        except Exception as exc:
            logger.warning("Could not read the at-most-once runs (%r); next sweep in %.0f s", exc, SWEEP_INTERVAL)
            return 0
        return sum(self._settle(run, now) for run in runs)

    def _alive(self, run: dict, now: float) -> bool:
        heard, pid = self.workers.get(run["hostname"], (None, None))
        return heard is not None and now - heard < self.lost_after and pid in (None, run["pid"])

    def _settle(self, run: dict, now: float) -> int:
        alive = self._alive(run, now)
        if alive and self.wall_clock() - run["started"] < self.lost_after:
            return 0  # a young run of a live worker: nothing to look at yet
        task_id, retries, backend = run["task_id"], run["retries"], self.backend
        try:
            meta = backend.stored_meta(task_id) or {}
            if meta.get("status") in ENDED_STATES or (meta.get("retries") or 0) > retries:
                backend.end_run(task_id, retries)  # it ended, and its record was left (a hard time limit)
                return 0
            if alive:
                return 0
            error = WorkerLostError(
                f"Worker {run['hostname']} (process {run['pid']}) stopped while running it"
                f" (no event for {self.lost_after:g} s, or restarted)"
            )
            backend.mark_as_failure(task_id, error)
            backend.end_run(task_id, retries)
        except Exception:
            logger.exception("Could not settle the run of task %s[%s] on %s", run["name"], task_id, run["hostname"])
            return 0
        logger.warning(
            "Task %s[%s] was running on %s, which stopped: stored as FAILURE", run["name"], task_id, run["hostname"]
        )
        return 1
