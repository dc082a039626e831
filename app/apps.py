from django.apps import AppConfig


class CeleryDemoConfig(AppConfig):
    name = "app"
    verbose_name = "Celery demo"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported for their side effects: Celery signal handlers, system checks and log fields.
        from app import checks, request_logging, signals, task_logging  # noqa: F401
