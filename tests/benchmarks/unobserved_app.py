"""The project's Celery app without its observability, for the benchmark's side-by-side run:
the same worker, TaskLog and result backend, but no Prometheus metrics handlers and no
structured task logging (app/monitoring/signals.py's handlers, app/task_logging.py and
django-structlog's task receivers are disconnected in every worker process before a task runs).

    celery -A tests.benchmarks.unobserved_app worker ...
"""

import weakref

from celery import signals
from celery.utils.dispatch.signal import Signal

from project.celery import app  # noqa: F401 - the app this module's worker runs

OBSERVABILITY_MODULES = ("app.monitoring.signals", "app.task_logging", "django_structlog")


def _is_observability(receiver) -> bool:
    module = getattr(receiver, "__module__", "") or ""
    return module.startswith(OBSERVABILITY_MODULES) and receiver.__name__ != "use_django_logging"


def disconnect_observability(**_) -> None:
    for signal in vars(signals).values():
        if not isinstance(signal, Signal):
            continue
        for _key, ref in list(signal.receivers):
            receiver = ref() if isinstance(ref, weakref.ReferenceType) else ref
            if receiver is not None and _is_observability(receiver):
                signal.disconnect(receiver)


# The main process receives messages (task_received); pool children run tasks.
signals.worker_ready.connect(disconnect_observability, weak=False)
signals.worker_process_init.connect(disconnect_observability, weak=False)
