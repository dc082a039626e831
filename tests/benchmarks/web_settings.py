"""The project's settings, with one more URL: an empty JSON view, the API benchmark's baseline
under the same middleware, gunicorn and logging."""

from project.settings import *  # noqa: F403

ROOT_URLCONF = "tests.benchmarks.web_urls"
