"""The project's Celery app, with a pool process that dies (SIGKILL) right after a task stored
its result: for tests that prove the history keeps what the backend stored.

    celery -A tests.apps.dies_after_storing worker ...

A task whose id starts with DIE_AFTER_STORING kills its pool process in task_success, which
Celery sends after the result is stored and before the worker's main process hears of it.
"""

import os
import signal

from celery import signals

from project.celery import app  # noqa: F401 - the app this module's worker runs

DIE_AFTER_STORING = "die-after-storing-"


@signals.task_success.connect
def die_after_storing(sender=None, **_):
    if (sender.request.id or "").startswith(DIE_AFTER_STORING):
        os.kill(os.getpid(), signal.SIGKILL)
