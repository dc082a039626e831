"""A task's queue: the one a call is sent to (Celery's router, CELERY_TASK_ROUTES) and the one
a received task came from (its routing key). Metrics, logs, the queued record, the canary and
the redelivery check all ask here."""

from celery import current_app

from app import rabbitmq_queues


def routed_queue(task_name: str, options: dict | None = None, app=None) -> str:
    """The queue a call of `task_name` is sent to: the call's own queue option, else the queue
    Celery's router picks (CELERY_TASK_ROUTES, else the default queue)."""
    queue = (options or {}).get("queue")
    if queue:
        return getattr(queue, "name", queue)
    return (app or current_app).amqp.router.route({}, task_name, (), {})["queue"].name


def queue_of(request_or_message) -> str:
    """The queue a received task (its request, or its message) was routed to: its routing key
    without a delay prefix (app/rabbitmq_queues.py); "" when it has none."""
    delivery_info = getattr(request_or_message, "delivery_info", None) or {}
    return rabbitmq_queues.queue_of_routing_key(delivery_info.get("routing_key"))
