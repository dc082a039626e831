"""The worker's step for RabbitMQ's native delayed delivery (quorum queues, app/rabbitmq_queues.py).

Celery's step binds every task queue of the app to the delayed-delivery exchanges, and a queue
that does not exist yet cannot be bound: on a new broker, the first worker of the long pool
found no ``default`` queue, logged CRITICAL "Native delayed delivery will not be available"
and left it unbound. Here every task queue is declared first (its own were by then)."""

import logging

from celery.worker.consumer.delayed_delivery import DelayedDelivery as CeleryDelayedDelivery

logger = logging.getLogger(__name__)


class DelayedDelivery(CeleryDelayedDelivery):
    def start(self, c):
        with c.app.connection_for_write() as connection:
            for queue in c.app.amqp.queues.values():
                with connection.channel() as channel:  # a failed declare closes its channel
                    try:
                        queue.bind(channel).declare()
                    except connection.channel_errors as exc:
                        logger.error("Cannot declare the task queue %r: %s", queue.name, exc)
        super().start(c)
