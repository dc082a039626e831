"""Where the web's start-up goes: the steps gunicorn's master takes to load project.wsgi, each
timed in one process (run by startup_memory.py with the image's packages, as a script; prints
JSON: seconds per step, in order).

    python -m tests.benchmarks.web_startup_steps
"""

import json
import time
from itertools import pairwise

STEPS = (
    "settings module (Celery app, redis-py, logging)",
    "django.setup() (apps and models)",
    "WSGI handler (middleware)",
    "URLconf (admin, API)",
)


def main() -> None:
    marks = [time.perf_counter()]
    from django.conf import settings

    settings.INSTALLED_APPS  # noqa: B018 - reading a setting imports the settings module
    marks.append(time.perf_counter())
    import django

    django.setup()
    marks.append(time.perf_counter())
    from django.core.wsgi import get_wsgi_application

    get_wsgi_application()
    marks.append(time.perf_counter())
    from django.urls import get_resolver

    get_resolver().resolve("/api/health/live")
    marks.append(time.perf_counter())
    steps = zip(STEPS, pairwise(marks), strict=True)
    print(json.dumps({step: later - earlier for step, (earlier, later) in steps}))


if __name__ == "__main__":
    main()
