"""A bare Django project, the start-up baseline for the web role: the same contrib apps and
PostgreSQL driver as the project, one empty JSON view, nothing else; settings, URLs and WSGI
application in this one module.

    DJANGO_SETTINGS_MODULE=tests.benchmarks.bare_django gunicorn tests.benchmarks.bare_django:application
"""

import os

from django.http import JsonResponse
from django.urls import path

SECRET_KEY = "bench"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = __name__
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "bench"}}
USE_TZ = True
TLS_CLIENTS = {}  # the project's gunicorn settings check these servers at start (project/tls.py)


def empty(request):
    return JsonResponse({})


urlpatterns = [path("api/health/live", empty)]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", __name__)
if os.environ["DJANGO_SETTINGS_MODULE"] == __name__:
    from django.core.wsgi import get_wsgi_application

    application = get_wsgi_application()
