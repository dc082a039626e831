"""The Celery patterns demo app: models, tasks, services, API and admin."""
