from django.core.management.base import BaseCommand

from app import services


class Command(BaseCommand):
    help = (
        "Create the default periodic schedules that are missing: the health_check canary on every "
        "CELERY_CANARY_QUEUES queue, and the clean-ups. Idempotent; never changes an existing one."
    )

    def handle(self, *args, **options):
        created = services.ensure_default_schedules()
        self.stdout.write(f"created: {', '.join(created)}" if created else "default schedules already present")
