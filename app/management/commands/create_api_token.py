from django.core.management.base import BaseCommand, CommandError

from app import services
from app.models import ApiToken


class Command(BaseCommand):
    help = "Create an API token and print its secret once (only a hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="A name to recognise the token by, e.g. the client using it.")

    def handle(self, *args, name: str, **options):
        if ApiToken.objects.filter(name=name).exists():
            raise CommandError(f"A token named {name!r} exists already; choose another name.")
        _token, secret = services.create_api_token(name=name)
        self.stdout.write(secret)
