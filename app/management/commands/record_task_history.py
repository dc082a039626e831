import signal

from django.core.management.base import BaseCommand, CommandError

from app import history_recorder
from project.celery import app as celery_app


class Command(BaseCommand):
    help = (
        "Fold the task history stream (Redis result backend) into TaskLog until SIGTERM or Ctrl-C. "
        "Beat runs one already; more can run side by side (they share the stream's consumer group)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--consumer", help="Consumer name in the group (default: host name and process).")

    def handle(self, *args, consumer: str | None = None, **options):
        stream = celery_app.backend.history_stream_client()
        if stream is None:
            raise CommandError("The result backend (RESULT_BACKEND_URL=django-db) writes TaskLog itself.")
        client, key = stream
        recorder = history_recorder.HistoryRecorder(
            client=client, stream=key, settings=history_recorder.recorder_settings(), consumer=consumer
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: recorder.stop())
        recorder.run()
