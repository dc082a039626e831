"""`migrate` for containers: wait for the database (bounded), then migrate under a database
lock, so several migrate jobs or pods started at once neither fail nor race."""

import time
from contextlib import contextmanager

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import OperationalError, connection

from app import services

# Any constant works; it names this project's migration lock among advisory locks.
LOCK_KEY = 4_815_162_342
LOCK_NAME = "celery_demo_migrate"


def wait_for_database(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection.ensure_connection()
            return
        except OperationalError as exc:
            if time.monotonic() >= deadline:
                raise CommandError(f"database not reachable after {timeout:g} s: {exc}") from exc
            connection.close()
            time.sleep(1)


@contextmanager
def migration_lock(timeout: float):
    """PostgreSQL advisory lock or MySQL named lock; SQLite (local use) serialises writers itself."""
    vendor = connection.vendor
    with connection.cursor() as cursor:
        if vendor == "postgresql":
            cursor.execute("SET lock_timeout = %s", [f"{int(timeout * 1000)}ms"])
            cursor.execute("SELECT pg_advisory_lock(%s)", [LOCK_KEY])
            cursor.execute("SET lock_timeout = 0")
        elif vendor == "mysql":
            cursor.execute("SELECT GET_LOCK(%s, %s)", [LOCK_NAME, int(timeout)])
            if cursor.fetchone()[0] != 1:
                raise CommandError(f"could not take the migration lock within {timeout:g} s")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            if vendor == "postgresql":
                cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])
            elif vendor == "mysql":
                cursor.execute("SELECT RELEASE_LOCK(%s)", [LOCK_NAME])


class Command(BaseCommand):
    help = "Wait for the database, then apply migrations and the default schedules under a lock."

    def add_arguments(self, parser):
        parser.add_argument("--wait", type=float, default=60, help="Seconds to wait for the database (60).")
        parser.add_argument("--lock-timeout", type=float, default=600, help="Seconds to wait for the lock (600).")

    def handle(self, *args, wait: float, lock_timeout: float, **options):
        wait_for_database(wait)
        with migration_lock(lock_timeout):
            call_command("migrate", interactive=False, verbosity=options["verbosity"])
            created = services.ensure_default_schedules()
        self.stdout.write(f"Migrated. Default schedules created: {', '.join(created) or 'none needed'}.")
