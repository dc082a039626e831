"""System checks run by `manage.py check` (and at every management command start-up)."""

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.compatibility)
def check_visibility_timeout(app_configs=None, **kwargs):
    """A Redis broker redelivers any message not acknowledged within the visibility timeout. A
    timeout that is set (CELERY_BROKER_VISIBILITY_TIMEOUT) must cover every task: a task that
    can run, or wait for its countdown, longer gets to a second worker while the first still
    runs it. Empty, each worker derives it from its own queues (app/redelivery.py)."""
    from app import redelivery
    from project.celery import app as celery_app

    visibility_timeout = settings.CELERY_BROKER_VISIBILITY_TIMEOUT
    if not settings.BROKER_IS_REDIS or visibility_timeout is None:
        return []
    reason = redelivery.problem(visibility_timeout, celery_app)
    if reason is None:
        return []
    needed, _task = redelivery.needed_seconds(celery_app)
    return [
        checks.Error(
            reason[0].upper() + reason[1:],
            hint=f"Set CELERY_BROKER_VISIBILITY_TIMEOUT above {needed:g}, or leave it empty.",
            id="app.E001",
        )
    ]
