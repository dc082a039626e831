import datetime as dt

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from app import services
from app.models import ApiToken, TokenScope


class Command(BaseCommand):
    help = "Create an API token for a user and print its secret once (only a hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="A name to recognise the token by, e.g. the client using it.")
        parser.add_argument("--owner", required=True, help="The username of the user who holds the token.")
        parser.add_argument(
            "--scope",
            choices=TokenScope.values,
            default=TokenScope.ENQUEUE,
            help="read: task status, progress, overview; enqueue: also start tasks (default); "
            "manage: also revoke any task.",
        )
        parser.add_argument(
            "--expires-in-days",
            type=int,
            metavar="DAYS",
            help="Refuse the token after this many days (default: never).",
        )

    def handle(self, *args, name: str, owner: str, scope: str, expires_in_days: int | None, **options):
        if ApiToken.objects.filter(name=name).exists():
            raise CommandError(f"A token named {name!r} exists already; choose another name.")
        try:
            user = get_user_model().objects.get_by_natural_key(owner)
        except get_user_model().DoesNotExist:
            raise CommandError(f"No user {owner!r}: create it first (manage.py createsuperuser).") from None
        if expires_in_days is not None and expires_in_days < 1:
            raise CommandError("--expires-in-days must be 1 or more.")
        expires_at = timezone.now() + dt.timedelta(days=expires_in_days) if expires_in_days else None
        _token, secret = services.create_api_token(name=name, owner=user, scope=scope, expires_at=expires_at)
        self.stdout.write(secret)
