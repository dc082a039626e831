"""django-celery-beat's DatabaseScheduler, with a heartbeat file and Prometheus metrics.

Every tick that completes touches CELERY_BEAT_HEARTBEAT_FILE (beat's liveness probe reads its
modification time) and sets django_celery_k8s_beat_last_tick_timestamp_seconds, whether or not
anything was due; a tick that raises does neither, so a stuck or failing scheduler goes stale.
Every due entry counts as a run when its task was sent, as an error when sending failed.
"""

import time
from pathlib import Path

from django.conf import settings
from django_celery_beat.schedulers import DatabaseScheduler as BaseDatabaseScheduler

from app.monitoring import metrics


class DatabaseScheduler(BaseDatabaseScheduler):
    def tick(self, *args, **kwargs):
        interval = super().tick(*args, **kwargs)
        heartbeat = Path(settings.CELERY_BEAT_HEARTBEAT_FILE)
        heartbeat.parent.mkdir(parents=True, exist_ok=True)
        heartbeat.touch()
        metrics.beat().last_tick.set(time.time())
        return interval

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        name = metrics.task_name(entry.task)
        try:
            result = super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        except Exception:
            # Celery's apply_entry logs it and goes on with the next entry.
            metrics.beat().errors.labels(name=name).inc()
            raise
        metrics.beat().runs.labels(name=name).inc()
        return result
