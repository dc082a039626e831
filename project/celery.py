"""The Celery application, wired to Django's settings (the CELERY_ namespace)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# The worker's probe files (alive, ready), written from its event loop: app/worker_health.py.
app.steps["consumer"].add("app.worker_health.HealthFiles")
