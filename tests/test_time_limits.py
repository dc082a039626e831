"""Per-call time limits sent in order (app/time_limits.py): a limit a call sets below the task's
defaults is the one the worker enforces, and the soft limit always comes first."""

import pytest
from kombu import Connection

from app import tasks, time_limits
from project.celery import app as celery_app

# time_limited_task's own limits: soft 10 s, hard 15 s.
TASK = {"task_soft": 10.0, "task_hard": 15.0}


@pytest.mark.parametrize(
    ("asked", "enforced"),
    [
        ((None, None), (None, None)),  # the task's defaults, in the worker
        ((1.0, 5.0), (1.0, 5.0)),  # both, in order: as asked
        ((None, 2.0), (1.333, 2.0)),  # hard under the task's soft limit: soft the same share (10/15)
        ((None, 12.0), (10.0, 12.0)),  # hard above the task's soft limit: the task's soft limit stays
        ((20.0, None), (20.0, 25.0)),  # soft over the task's hard limit: hard after the task's grace (5 s)
        ((3.0, None), (3.0, 15.0)),  # soft under the task's hard limit: the task's hard limit stays
        ((5.0, 3.0), (2.0, 3.0)),  # out of order: the hard limit kept, as if alone
    ],
)
def test_the_limits_a_worker_enforces(asked, enforced):
    soft, hard = asked
    assert time_limits.effective(soft=soft, hard=hard, **TASK) == enforced


def test_without_task_defaults_a_lone_limit_is_completed_by_a_fixed_share():
    assert time_limits.effective(soft=None, hard=10.0, task_soft=None, task_hard=None) == (None, 10.0)
    assert time_limits.effective(soft=None, hard=10.0, task_soft=30.0, task_hard=None) == (8.0, 10.0)
    assert time_limits.effective(soft=10.0, hard=None, task_soft=None, task_hard=5.0) == (10.0, 12.0)


def test_a_task_without_limits_of_its_own_gets_the_settings_defaults():
    soft, hard = time_limits.task_defaults("app.tasks.add")
    assert (soft, hard) == (celery_app.conf.task_soft_time_limit, celery_app.conf.task_time_limit)
    assert time_limits.task_defaults("app.tasks.time_limited_task") == (10, 15)


def published_time_limits(**options) -> list:
    """The timelimit header of a message really published (memory transport), as a worker reads it."""
    with Connection("memory://") as connection:
        tasks.time_limited_task.apply_async(args=[30], connection=connection, queue="limits", **options)
        message = connection.SimpleQueue("limits").get(timeout=1)
        return list(message.headers["timelimit"])


def test_a_published_call_carries_both_limits_in_order():
    assert published_time_limits(time_limit=2) == [2, 1.333]
    assert published_time_limits(soft_time_limit=20) == [25, 20]
    assert published_time_limits(soft_time_limit=1, time_limit=3) == [3, 1]
    assert published_time_limits() == [15, 10]  # apply_async sends the task's own limits
    assert published_time_limits(time_limit=30) == [30, 10]
