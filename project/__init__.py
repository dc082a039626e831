"""The Django project: settings, URLs, WSGI/ASGI and the Celery app."""

from project.celery import app as celery_app

__all__ = ["celery_app"]
__version__ = "0.1.0"
