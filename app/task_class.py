"""The base class of the project's tasks (project/celery.py), and the options of its
at-least-once tasks.

The class is Celery's task for Django projects (delay_on_commit, apply_async_on_commit), except
that an at-least-once task whose retry cannot be published is never dropped, and an at-most-once
task whose message comes twice runs once (app/lost_tasks.py).

Task.retry publishes the next attempt and, if that fails (the broker is down or restarting),
raises Reject(requeue=False): the worker stores FAILURE and acknowledges the message, so the
task is gone although its delivery guarantee says at least once. Here an acks_late task's
message is requeued instead: it runs again when the broker takes it back (on Redis, if even the
requeue cannot reach the broker, the message stays unacknowledged and comes back after the
visibility timeout). An at-most-once task keeps Celery's behaviour: it fails.
"""

import logging

from billiard.einfo import ExceptionWithTraceback
from celery.backends.redis import RedisBackend
from celery.contrib.django.task import DjangoTask
from celery.exceptions import Ignore, Reject, TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request as CeleryRequest

from app import lost_tasks, rabbitmq_queues

logger = logging.getLogger(__name__)

# At least once, for tasks safe to redeliver (the effect is the same however many times they
# run): acknowledged after the run, redelivered if the worker dies. A run whose pool process
# dies (an OOM kill, a SIGKILL) is sent again at once as a retry: counted, so a task that kills
# its process every time fails after max_retries (3) instead of looping forever.
IDEMPOTENT = {"acks_late": True, "reject_on_worker_lost": True, "retry_on_worker_lost": True, "default_retry_delay": 0}


class Request(CeleryRequest):
    """Celery's worker-side request, naming the queue of a delayed message, reporting a task
    killed at its hard time limit once, and running again a chord header task whose process died
    after storing its success.

    The pool reports a hard time-limit kill twice: its error callback (on_failure) and then its
    timeout callback (on_timeout), and since Celery 5.7 (celery#10226) both store the failure,
    send task_failure and the task-failed event, and on_failure runs the errbacks a second time.
    Here on_timeout alone reports it; a cold shutdown, where on_timeout reports nothing, and a
    TimeLimitExceeded raised by the task itself (return_ok) keep Celery's handling.

    A task whose pool process dies after it stored SUCCESS is acknowledged and not run again
    (Celery 5.7). For a chord header task that loses the chord: the process stores SUCCESS, then
    counts the task in its chord and, as the last one, publishes the callback; killed in between
    (make chaos on RabbitMQ saw it), the callback is never sent. Here such a task is retried
    like any at-least-once task whose process died: the second run's SUCCESS is not stored again
    (a stored SUCCESS is never replaced), Celery's Redis backend counts each header task once,
    and the last one publishes the callback. Not with the database backend: its chord counter
    would count the task twice, and could call the callback before the last header task ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A message that waited in RabbitMQ's delayed delivery (a countdown, a retry's delay)
        # comes from a delay exchange with the delay in front of its routing key. The task sees
        # it as sent to its queue: its stored state, history, logs and metrics name the queue,
        # and a retry goes to the queue's exchange (Celery sends one where the message came
        # from: a retry with no delay was unroutable in a delay exchange, and lost).
        routing_key = self._delivery_info.get("routing_key")
        queue = rabbitmq_queues.queue_of_routing_key(routing_key)
        if routing_key and queue != routing_key:
            self._delivery_info.update(routing_key=queue, exchange=rabbitmq_queues.TASK_EXCHANGE.name)

    def _success_was_stored(self):
        task = self.task
        if (
            self._context.chord
            and task.acks_late
            and task.retry_on_worker_lost
            and isinstance(task.backend, RedisBackend)
        ):
            return False
        return super()._success_was_stored()

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, TimeLimitExceeded) and not return_ok and not worker_state.should_terminate:
            return None
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class Task(DjangoTask):
    Request = "app.task_class:Request"

    def __call__(self, *args, **kwargs):
        """An at-most-once task runs once per attempt even when its message comes twice (on Redis,
        an acknowledgement lost while the broker restarts leaves the message to come back after
        the visibility timeout: make chaos saw an email-like task run twice that way), and its run
        is recorded, so that beat fails it if its worker dies (app/lost_tasks.py)."""
        request = self.request
        if not self.acks_late and request.id and not request.is_eager and not request.called_directly:
            if not lost_tasks.start_run(self, request):
                logger.warning("At-most-once task %s[%s] ran already: not run again", self.name, request.id)
                raise Ignore()
        return super().__call__(*args, **kwargs)

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        """After the run's state is stored: the record of an at-most-once run goes (Celery logs
        an error raised here, and beat's sweep removes a record left behind)."""
        lost_tasks.end_run(self, task_id)
        return super().after_return(status, retval, task_id, args, kwargs, einfo)

    def retry(self, *args, **kwargs):
        try:
            return super().retry(*args, **kwargs)
        except Reject as rejected:
            if rejected.requeue or not self.acks_late or self.request.called_directly:
                raise
            raise Reject(rejected.reason, requeue=True) from rejected
