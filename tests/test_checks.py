"""The broker visibility-timeout system check."""

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from app.checks import check_visibility_timeout, longest_hard_time_limit
from app.tasks import MAX_COUNTDOWN_SECONDS
from project.celery import app as celery_app


def test_default_settings_pass():
    assert check_visibility_timeout() == []


def test_the_longest_hard_limit_includes_per_task_limits(monkeypatch):
    monkeypatch.setattr(celery_app.tasks["app.tasks.generate_report"], "time_limit", 5000)

    assert longest_hard_time_limit(celery_app) == 5000
    assert check_visibility_timeout()[0].id == "app.E001"


def test_a_visibility_timeout_below_limit_plus_countdown_fails_manage_py_check(settings):
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": settings.CELERY_TASK_TIME_LIMIT}

    errors = check_visibility_timeout()

    assert [error.id for error in errors] == ["app.E001"]
    assert f"longest countdown ({MAX_COUNTDOWN_SECONDS} s)" in errors[0].msg
    with pytest.raises(SystemCheckError, match=r"app\.E001"):
        call_command("check")


def test_the_check_does_not_apply_to_rabbitmq(settings):
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 1}

    assert check_visibility_timeout() == []


@pytest.mark.django_db
def test_models_and_migrations_agree():
    # Exits non-zero (SystemExit) when a model change has no migration.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)
