"""The broker visibility timeout: derived per worker from its queues' tasks (app/redelivery.py),
and checked when it is set (manage.py check, and a worker's start)."""

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from app import redelivery
from app.checks import check_visibility_timeout
from app.tasks import LONG_LIMITS, MAX_COUNTDOWN_SECONDS
from project.celery import app as celery_app


def test_the_default_queue_needs_its_short_tasks_limit_and_the_long_queue_its_own():
    default, _ = redelivery.needed_seconds(celery_app, {"default"})
    long, task = redelivery.needed_seconds(celery_app, {"long"})

    # Short tasks: the default hard limit (30 s) and the longest retry countdown (15 s).
    assert default == celery_app.conf.task_time_limit + MAX_COUNTDOWN_SECONDS == 45
    assert long == LONG_LIMITS["time_limit"] + MAX_COUNTDOWN_SECONDS == 375
    assert celery_app.tasks[task].time_limit == LONG_LIMITS["time_limit"]
    assert redelivery.needed_seconds(celery_app) == (long, task)  # all queues: the longest


def test_at_most_once_tasks_count_only_with_their_countdown(monkeypatch):
    # time_limited_task is at most once: acknowledged when it starts, so its run time is not
    # spent unacknowledged, however long its limit.
    monkeypatch.setattr(celery_app.tasks["app.tasks.time_limited_task"], "time_limit", 5000)
    assert redelivery.needed_seconds(celery_app, {"long"})[0] == 375

    monkeypatch.setattr(celery_app.tasks["app.tasks.generate_report"], "time_limit", 5000)
    assert redelivery.needed_seconds(celery_app, {"long"}) == (
        5000 + MAX_COUNTDOWN_SECONDS,
        "app.tasks.generate_report",
    )


def test_default_settings_pass():
    assert check_visibility_timeout() == []


def test_a_visibility_timeout_set_below_the_longest_need_fails_manage_py_check(settings):
    settings.CELERY_BROKER_VISIBILITY_TIMEOUT = 100

    errors = check_visibility_timeout()

    assert [error.id for error in errors] == ["app.E001"]
    assert "must exceed 375 s" in errors[0].msg
    assert f"longest countdown ({MAX_COUNTDOWN_SECONDS} s)" in errors[0].msg
    with pytest.raises(SystemCheckError, match=r"app\.E001"):
        call_command("check")
    settings.CELERY_BROKER_VISIBILITY_TIMEOUT = 376
    assert check_visibility_timeout() == []


def test_the_check_does_not_apply_to_rabbitmq(settings):
    settings.BROKER_IS_REDIS = False
    settings.CELERY_BROKER_VISIBILITY_TIMEOUT = 1

    assert check_visibility_timeout() == []


@pytest.mark.django_db
def test_models_and_migrations_agree():
    # Exits non-zero (SystemExit) when a model change has no migration.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)
