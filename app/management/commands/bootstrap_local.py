"""Prepare a local development database in one Django start-up (used by `make run`)."""

import os
import secrets
import sys

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import transaction

from app import services
from app.models import ApiToken, TokenScope

ADMIN_USERNAME = "admin"
TOKEN_NAME = "local"  # noqa: S105 (a label, not a secret)


class Command(BaseCommand):
    help = (
        "Migrate, add the missing default schedules and, only when no user 'admin' exists, create that "
        "superuser with a random password and an API token, printing both once (neither is stored in clear)."
    )

    def handle(self, *args, **options):
        call_command("migrate", interactive=False, verbosity=options["verbosity"])
        created = services.ensure_default_schedules()
        self.stdout.write(f"Default schedules: {'created ' + ', '.join(created) if created else 'present'}.")

        user_model = get_user_model()
        if user_model.objects.filter(username=ADMIN_USERNAME).exists():
            manage = manage_command()
            self.stdout.write(
                f"User '{ADMIN_USERNAME}' exists. Forgot its password? {manage} changepassword {ADMIN_USERNAME}\n"
                f"A new API token: {manage} create_api_token my-client --owner {ADMIN_USERNAME} --scope enqueue"
            )
            return

        password = secrets.token_urlsafe(12)
        token_name = TOKEN_NAME
        if ApiToken.objects.filter(name=token_name).exists():
            token_name = f"{TOKEN_NAME}-{secrets.token_hex(3)}"
        with transaction.atomic():
            admin = user_model.objects.create_superuser(ADMIN_USERNAME, f"{ADMIN_USERNAME}@localhost", password)
            _token, secret = services.create_api_token(name=token_name, owner=admin, scope=TokenScope.MANAGE)

        self.stdout.write(
            "\n".join(
                [
                    "",
                    "=" * 72,
                    "First run: created a local superuser and an API token.",
                    "They are shown this once and stored only as hashes; copy them now.",
                    f"  Admin username  {ADMIN_USERNAME}",
                    f"  Admin password  {password}",
                    f"  API token       {secret}   (name '{token_name}', scope manage; send 'Authorization: Bearer <token>')",
                    "=" * 72,
                    "",
                ]
            )
        )


def manage_command() -> str:
    """How to run manage.py from the checkout, pasteable: with the interpreter that runs this one
    (`make run`'s .venv/bin/python), not a bare manage.py that needs an activated venv."""
    return f"{os.path.relpath(sys.executable)} manage.py"
