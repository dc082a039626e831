from django.core.management.base import BaseCommand

from app import services


class Command(BaseCommand):
    help = "Create the default periodic schedules (health check, clean-ups) that are missing. Idempotent."

    def handle(self, *args, **options):
        created = services.ensure_default_schedules()
        self.stdout.write(f"created: {', '.join(created)}" if created else "default schedules already present")
