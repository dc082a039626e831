"""The Celery app Flower runs with: the project's Celery settings (django.conf.settings, the
CELERY_ namespace, as project/celery.py reads them), without Django's app registry.

Flower talks only to the broker: task events, inspect and control. The project's own app loads
every Django app and model in each process it runs in (Celery's Django fixup); measured, that was
a third of Flower's memory. Results are read with Celery's plain Redis backend (the same keys);
with RESULT_BACKEND_URL=django-db Flower shows none.

    celery -A project.flower_app flower
"""

import os

from celery import Celery
from django.conf import settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project", fixups=[], set_as_current=True)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.result_backend = settings.RESULT_BACKEND_URL if settings.RESULT_BACKEND_URL != "django-db" else None
