"""WSGI entry point for gunicorn."""

import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

from project import tracing

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

# Before the handler loads the middleware: OpenTelemetry's joins it. Each gunicorn worker
# starts exporting after the fork (project/gunicorn_conf.py).
if tracing.enabled():
    tracing.instrument()
application = get_wsgi_application()
# After get_wsgi_application(), which sets Django up: a hostile Content-Type is a 415, not a 500.
from app.api_errors import LenientContentTypeRequest  # noqa: E402

application.request_class = LenientContentTypeRequest
# The URLconf (the admin, the API and its schemas) now rather than at each worker's first
# request: gunicorn imports this module once in the master (preload_app), and the workers it
# forks share those pages and answer their first request without importing anything.
get_resolver().resolve("/api/health/live")
