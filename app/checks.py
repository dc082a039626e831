"""System checks run by `manage.py check` (and at every management command start-up)."""

from django.conf import settings
from django.core import checks

REDELIVERING_BROKER_SCHEMES = ("redis", "rediss", "sentinel", "sqs")


def longest_hard_time_limit(celery_app) -> float:
    limits = [settings.CELERY_TASK_TIME_LIMIT or 0]
    limits += [task.time_limit or 0 for name, task in celery_app.tasks.items() if not name.startswith("celery.")]
    return max(limits)


@checks.register(checks.Tags.compatibility)
def check_visibility_timeout(app_configs=None, **kwargs):
    """A Redis (or SQS) broker redelivers any message not acknowledged within the visibility
    timeout. If a task can run, or wait for its countdown, longer than that, a second worker
    gets it while the first still runs: the task runs twice."""
    from app.tasks import MAX_COUNTDOWN_SECONDS
    from project.celery import app as celery_app

    scheme = settings.CELERY_BROKER_URL.split("://", 1)[0].split("+")[0]
    if scheme not in REDELIVERING_BROKER_SCHEMES:
        return []
    visibility_timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout", 3600)
    hard_limit = longest_hard_time_limit(celery_app)
    needed = hard_limit + MAX_COUNTDOWN_SECONDS
    if visibility_timeout > needed:
        return []
    return [
        checks.Error(
            f"The broker visibility timeout ({visibility_timeout} s) must exceed the longest hard "
            f"time limit ({hard_limit} s) plus the longest countdown ({MAX_COUNTDOWN_SECONDS} s).",
            hint=f"Set CELERY_BROKER_VISIBILITY_TIMEOUT above {needed:g}, or lower CELERY_TASK_TIME_LIMIT.",
            id="app.E001",
        )
    ]
