from django.apps import AppConfig


class CeleryDemoConfig(AppConfig):
    name = "app"
    verbose_name = "Celery demo"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported for their side effects: Celery signal handlers (the app's and the metrics'),
        # system checks, log fields and the token-change receivers, per-call time limits completed
        # at publish, a worker's visibility timeout.
        from app import api_tokens, checks, redelivery, request_logging, signals, task_logging, time_limits  # noqa: F401
        from app.monitoring import signals as metrics_signals  # noqa: F401
