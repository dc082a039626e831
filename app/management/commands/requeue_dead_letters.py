from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from app import rabbitmq_queues


class Command(BaseCommand):
    help = (
        "Send the messages of a RabbitMQ task queue's dead-letter queue (<queue>.dead-letter: messages "
        "delivered more than RABBITMQ_DELIVERY_LIMIT times, or rejected by a worker) back to the queue."
    )

    def add_arguments(self, parser):
        parser.add_argument("queue", help="The task queue, e.g. default.")
        parser.add_argument("--limit", type=int, default=None, help="Send at most this many (oldest first).")

    def handle(self, *args, queue: str, limit: int | None, **options):
        if not settings.BROKER_IS_RABBITMQ:
            raise CommandError("Dead-letter queues exist on RabbitMQ only; CELERY_BROKER_URL names another broker.")
        if queue.endswith(rabbitmq_queues.DEAD_LETTER_SUFFIX):
            raise CommandError(
                f"Name the task queue, not its dead-letter queue: {queue.removesuffix(rabbitmq_queues.DEAD_LETTER_SUFFIX)!r}."
            )
        if limit is not None and limit < 1:
            raise CommandError("--limit must be at least 1.")
        from project.celery import app

        with app.connection_for_write() as connection:
            try:
                moved = rabbitmq_queues.requeue_dead_letters(connection, queue, limit)
            except connection.channel_errors as exc:
                raise CommandError(f"Cannot read {rabbitmq_queues.dead_letter_queue_name(queue)!r}: {exc}") from exc
        self.stdout.write(
            f"Sent {moved} message(s) from {rabbitmq_queues.dead_letter_queue_name(queue)} back to {queue}."
        )
