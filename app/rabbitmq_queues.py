"""The task queues on RabbitMQ: quorum queues with a delivery limit and a dead-letter queue each.

A quorum queue is replicated across the RabbitMQ cluster (a classic queue lives on one node) and
counts how often each message was handed out and came back: when a consumer rejects it with
requeue, or dies holding it (a worker SIGKILLed or OOM-killed mid-task). After
RABBITMQ_DELIVERY_LIMIT returns the message goes to the queue's dead-letter queue,
``<queue>.dead-letter``, instead of being delivered again: a poison message that kills every worker
that takes it stops there, kept for an operator (``manage.py requeue_dead_letters`` sends it
back) and counted by the celery_queue_length metric. Messages a worker rejects without requeue
(an unknown task name, a body it cannot decode) go there too, at-least-once: RabbitMQ removes
them from the task queue only once the dead-letter queue has them.

The queues sit on one topic exchange, ``tasks``: Celery then keeps countdowns, ETAs and retry
delays in RabbitMQ (its native delayed delivery, a cascade of ``celery_delayed_*`` queues the
worker declares), not in a worker's memory, where a quorum queue's per-consumer prefetch
would let them block it. A queue name has no dot: the topic bindings ``#.<queue>`` that the delayed
delivery makes would match the queue ``<prefix>.<queue>`` as well.

Celery's task ``expires`` is enforced by the worker here, not by a message TTL (a TTL would
dead-letter every expired message): a worker that receives an expired task stores it REVOKED.
"""

import re

from kombu import Exchange, Queue

TASK_EXCHANGE = Exchange("tasks", type="topic", durable=True)
DEAD_LETTER_SUFFIX = ".dead-letter"
QUEUE_TYPES = ("quorum", "classic")

# A message delayed by native delayed delivery carries the delay, 28 binary digits, in front
# of its routing key: "0.0.…1.0.default". kombu strips it the same way when it delays again.
DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")
DELAYED_DELIVERY_PREFIX = "celery_delayed_"  # its exchanges and queues


def dead_letter_queue_name(queue: str) -> str:
    return f"{queue}{DEAD_LETTER_SUFFIX}"


def queue_of_routing_key(routing_key: str | None) -> str:
    """The queue a task message was routed to: its routing key without a delay prefix. Called
    for every task and publish: a routing key that cannot carry the prefix skips the regex."""
    if not routing_key:
        return ""
    if routing_key[0] not in "01":
        return routing_key
    return DELAY_PREFIX.sub("", routing_key, count=1)


class TaskQueue(Queue):
    """A quorum task queue whose declaration declares its dead-letter queue first: wherever
    the queue is declared (a worker consuming it, a web process publishing to it), its dead
    letters have somewhere to go."""

    def dead_letter_queue(self) -> Queue:
        return Queue(dead_letter_queue_name(self.name), durable=True, queue_arguments={"x-queue-type": "quorum"})

    def declare(self, nowait=False, channel=None):
        from amqp.exceptions import PreconditionFailed  # py-amqp: only where RabbitMQ is the broker

        try:
            if not self.no_declare:
                self.dead_letter_queue().bind(channel or self.channel).declare(nowait=nowait)
            return super().declare(nowait=nowait, channel=channel)
        except PreconditionFailed as exc:
            # RabbitMQ keeps a queue's type and arguments for its life: one declared before as a
            # classic queue, or with another delivery limit, refuses these.
            raise PreconditionFailed(
                f"{exc.reply_text}. The queue {self.name!r} exists with other arguments: a classic queue "
                "cannot become a quorum queue, nor a quorum queue change its delivery limit, in place. "
                "README, 'Delivery guarantees', says how to move; RABBITMQ_QUEUE_TYPE=classic keeps classic queues.",
                exc.method_sig,
                reply_code=exc.reply_code,
            ) from exc


def task_queue(name: str, *, delivery_limit: int) -> TaskQueue:
    if "." in name or not name:
        raise ValueError(f"RabbitMQ task queue names must be non-empty and without dots; got {name!r}.")
    return TaskQueue(
        name,
        TASK_EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": "",  # the default exchange: straight to the queue named next
            "x-dead-letter-routing-key": dead_letter_queue_name(name),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",  # what at-least-once dead-lettering needs
        },
    )


def celery_settings(queue_names: list[str], *, queue_type: str, delivery_limit: int) -> dict:
    """The Celery settings (lower case, as in app.conf) that declare `queue_names` as task
    queues of `queue_type` on RabbitMQ; empty for classic queues (Celery's defaults: a direct
    exchange per queue, no delivery limit)."""
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"RABBITMQ_QUEUE_TYPE must be one of {', '.join(QUEUE_TYPES)}; got {queue_type!r}.")
    if delivery_limit < 1:
        raise ValueError(f"RABBITMQ_DELIVERY_LIMIT must be at least 1; got {delivery_limit}.")
    if queue_type == "classic":
        return {}
    return {
        "task_queues": [task_queue(name, delivery_limit=delivery_limit) for name in queue_names],
        "task_default_exchange": TASK_EXCHANGE.name,
        "task_default_exchange_type": TASK_EXCHANGE.type,
        # A queue named only at run time (a worker's -Q, a call's queue=): quorum as well, on a
        # topic exchange of its name, but without a delivery limit.
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
    }


def dead_letter_queues(queues) -> list[str]:
    """The dead-letter queue names of those of `queues` (app.conf.task_queues) that have one."""
    return [dead_letter_queue_name(queue.name) for queue in queues or () if isinstance(queue, TaskQueue)]


# Headers RabbitMQ adds on delivery and dead-lettering; a message sent back starts afresh.
BROKER_HEADERS = ("x-death", "x-delivery-count", "x-first-death-", "x-last-death-")
KEPT_PROPERTIES = ("content_type", "content_encoding", "correlation_id", "reply_to", "priority")


def requeue_dead_letters(connection, queue: str, limit: int | None = None) -> int:
    """Send the messages of `queue`'s dead-letter queue back to `queue`, oldest first, up to
    `limit`; returns how many. Each is removed from the dead-letter queue only after RabbitMQ
    confirmed it in `queue` (a connection with confirm_publish), so a failure midway loses none:
    the message in hand is then in both, and runs at least once."""
    from kombu import Producer

    channel = connection.channel()
    try:
        dead_letters = Queue(dead_letter_queue_name(queue), no_declare=True).bind(channel)
        producer = Producer(channel, routing_key=queue)  # the default exchange: straight to `queue`
        moved = 0
        while limit is None or moved < limit:
            message = dead_letters.get(no_ack=False, accept=None)
            if message is None:
                break
            headers = {key: value for key, value in message.headers.items() if not key.startswith(BROKER_HEADERS)}
            properties = {key: message.properties[key] for key in KEPT_PROPERTIES if key in message.properties}
            producer.publish(message.body, headers=headers, delivery_mode=2, retry=True, **properties)
            message.ack()
            moved += 1
        return moved
    finally:
        channel.close()


def expires_in_worker(declare, exchange) -> bool:
    """Whether a task message published to `exchange` with these `declare` entities is left to
    expire in the worker: it goes to a task queue with a dead-letter queue, or into the delayed
    delivery, whose queues pass a message on to the next when its TTL ends (a message TTL there
    would cut the delay short)."""
    exchange_name = getattr(exchange, "name", exchange) or ""
    return exchange_name.startswith(DELAYED_DELIVERY_PREFIX) or any(
        isinstance(entity, TaskQueue) for entity in declare or ()
    )
