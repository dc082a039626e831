"""The base class of the project's tasks (project/celery.py), and the options of its
at-least-once tasks.

The class is Celery's task for Django projects (delay_on_commit, apply_async_on_commit), except
that an at-least-once task whose retry cannot be published is never dropped.

Task.retry publishes the next attempt and, if that fails (the broker is down or restarting),
raises Reject(requeue=False): the worker stores FAILURE and acknowledges the message, so the
task is gone although its delivery guarantee says at least once. Here an acks_late task's
message is requeued instead: it runs again when the broker takes it back (on Redis, if even the
requeue cannot reach the broker, the message stays unacknowledged and comes back after the
visibility timeout). An at-most-once task keeps Celery's behaviour: it fails.
"""

from celery.contrib.django.task import DjangoTask
from celery.exceptions import Reject

# At least once, for tasks safe to redeliver (the effect is the same however many times they
# run): acknowledged after the run, redelivered if the worker dies. A run whose pool process
# dies (an OOM kill, a SIGKILL) is sent again at once as a retry: counted, so a task that kills
# its process every time fails after max_retries (3) instead of looping forever.
IDEMPOTENT = {"acks_late": True, "reject_on_worker_lost": True, "retry_on_worker_lost": True, "default_retry_delay": 0}


class Task(DjangoTask):
    def retry(self, *args, **kwargs):
        try:
            return super().retry(*args, **kwargs)
        except Reject as rejected:
            if rejected.requeue or not self.acks_late or self.request.called_directly:
                raise
            raise Reject(rejected.reason, requeue=True) from rejected
