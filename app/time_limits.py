"""Per-call time limits that mean what they say.

A call may pass ``time_limit`` or ``soft_time_limit`` (apply_async, the API, the admin's
re-run). Celery fills the one left out from the task's defaults in the worker, and a pair
out of order goes wrong there: a hard limit of 2 s under a task whose soft limit is 10 s runs
the task for 10 s, then sends it the soft limit and kills it at once, so it both "succeeds"
with a partial result and fails at the hard limit (celery/concurrency/asynpool.py schedules
the hard timer at ``hard - soft`` after the soft one).

``complete_time_limits`` runs on every publish (before_task_publish) and sends both limits
whenever a call set one, in order:
- only a hard limit, at or under the task's soft limit: the soft limit becomes the same share
  of it as the task's defaults have (10 s of 15 s: a 2 s hard limit gets 1.33 s), so the task
  still gets its soft limit to save its work before the kill;
- only a soft limit, at or over the task's hard limit: the hard limit becomes it plus the
  task's own grace between the two (15 s - 10 s: a 20 s soft limit gets a 25 s hard limit);
- both, out of order (the API refuses that with a 422; another caller's call is sent): the
  hard limit is kept, as if it came alone, and a warning logged.
"""

import logging

from celery import current_app, signals

logger = logging.getLogger(__name__)

# The soft limit's share of the hard one when a task has no soft limit of its own.
DEFAULT_SOFT_SHARE = 0.8


def effective(
    *, soft: float | None, hard: float | None, task_soft: float | None, task_hard: float | None
) -> tuple[float | None, float | None]:
    """(soft, hard) a worker should enforce for a call that asked for (soft, hard), given the
    task's defaults (task_soft, task_hard; None: no limit). None stays None: no limit of that
    kind, or the task's default in effect."""
    if soft is None and hard is None:
        return None, None
    if soft is not None and hard is not None:
        if soft < hard:
            return soft, hard
        logger.warning("soft_time_limit %g s is not below time_limit %g s: the hard limit is kept", soft, hard)
        soft = None
    if hard is not None:
        if task_soft is None or task_soft < hard:
            return task_soft, hard
        share = task_soft / task_hard if task_hard and task_soft < task_hard else DEFAULT_SOFT_SHARE
        return round(hard * share, 3), hard
    if task_hard is None or soft < task_hard:
        return soft, task_hard
    grace = (
        task_hard - task_soft if task_soft is not None and task_soft < task_hard else soft * (1 - DEFAULT_SOFT_SHARE)
    )
    return soft, round(soft + grace, 3)


def task_defaults(task_name: str) -> tuple[float | None, float | None]:
    """(soft, hard) limits a worker applies to this task when a call sets none."""
    conf = current_app.conf
    task = current_app.tasks.get(task_name)
    soft = getattr(task, "soft_time_limit", None) or conf.task_soft_time_limit
    hard = getattr(task, "time_limit", None) or conf.task_time_limit
    return soft, hard


@signals.before_task_publish.connect
def complete_time_limits(headers: dict | None = None, **_) -> None:
    """before_task_publish: both limits in order in the message whenever the call set one.
    Celery's message protocol 2 carries them as headers["timelimit"] = (hard, soft)."""
    if not headers:
        return
    hard, soft = headers.get("timelimit") or (None, None)
    if hard is None and soft is None:
        return
    task_soft, task_hard = task_defaults(headers.get("task", ""))
    if soft is not None and hard is not None and soft >= hard:
        # Task.apply_async sends the task's own limits beside the ones the call set: of a pair
        # out of order, the one equal to the task's default is not the call's.
        if hard == task_hard and soft != task_soft:
            hard = None
        elif soft == task_soft:
            soft = None
    soft, hard = effective(soft=soft, hard=hard, task_soft=task_soft, task_hard=task_hard)
    headers["timelimit"] = (hard, soft)
