"""The app's tables: task history, generated reports, schedules and API tokens."""

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

TRACEBACK_MAX_CHARS = 10_000


class TaskState(models.TextChoices):
    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


# A task in one of these ends no more (Celery's READY_STATES): the API's "ready", the history's
# cleanup, the admin's revoke (which skips them) and a run's recorded run time all ask here.
FINISHED_STATES = frozenset({TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED})


class TaskLog(models.Model):
    """One row per task id: what ran, where, for how long and how it ended.

    The durable history, written only by app/task_history.py from the states the result
    backend stores; the live state (and full result) of a recent task is in the backend.
    """

    task_id = models.CharField(max_length=255, unique=True)
    task_name = models.CharField(max_length=255, db_index=True)
    state = models.CharField(max_length=16, choices=TaskState.choices, default=TaskState.PENDING, db_index=True)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    result = models.JSONField(null=True, blank=True)
    exception = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    worker = models.CharField(max_length=255, blank=True)
    queue = models.CharField(max_length=255, blank=True, db_index=True)
    retries = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    duration = models.DurationField(null=True, blank=True, help_text="Run time of the last attempt.")
    time_limit = models.FloatField(
        null=True, blank=True, help_text="Hard time limit the call set, in seconds (empty: the task's default)."
    )
    soft_time_limit = models.FloatField(
        null=True, blank=True, help_text="Soft time limit the call set, in seconds (empty: the task's default)."
    )
    version = models.BigIntegerField(
        null=True, blank=True, editable=False, help_text="Position in the history stream of the last state applied."
    )
    recorded_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When the history last wrote this row."
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["task_name", "state"])]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.state}"

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED_STATES

    def call_options(self) -> dict:
        """The options to send this call again with: its queue and the time limits it set."""
        options = {"queue": self.queue or None, "time_limit": self.time_limit, "soft_time_limit": self.soft_time_limit}
        return {key: value for key, value in options.items() if value is not None}


class TaskRun(models.Model):
    """An attempt of an at-most-once task that a worker claimed and ran, with the database result
    backend (RESULT_BACKEND_URL=django-db; the Redis backend keeps the same in Redis).

    The row is the claim: a second delivery of the same attempt finds it and does not run. While
    `running`, beat watches the worker (app/lost_tasks.py) and stores FAILURE if it dies first.
    """

    task_id = models.CharField(max_length=255)
    retries = models.PositiveIntegerField()
    task_name = models.CharField(max_length=255)
    worker = models.CharField(max_length=255, help_text="The worker's hostname.")
    worker_pid = models.PositiveIntegerField(help_text="The worker's main process.")
    started_at = models.DateTimeField(db_index=True)
    running = models.BooleanField(default=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["task_id", "retries"], name="task_run_once_per_attempt")]
        indexes = [models.Index(fields=["running"], condition=models.Q(running=True), name="task_run_running")]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] attempt {self.retries} on {self.worker}"


def format_exception(exception: BaseException | str) -> str:
    if isinstance(exception, BaseException):
        return f"{type(exception).__name__}: {exception}"
    return str(exception)


def truncate_traceback(traceback: str) -> str:
    """Keep the end of a long traceback: the frames nearest the error say the most."""
    if len(traceback) <= TRACEBACK_MAX_CHARS:
        return traceback
    return "...(truncated)\n" + traceback[-TRACEBACK_MAX_CHARS:]


class ReportType(models.TextChoices):
    TASK_SUMMARY = "task_summary", "Task summary"
    USER_SUMMARY = "user_summary", "User summary"


class ReportStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Report(models.Model):
    """A report computed from the database by the generate_report task."""

    report_type = models.CharField(max_length=32, choices=ReportType.choices, db_index=True)
    status = models.CharField(max_length=16, choices=ReportStatus.choices, default=ReportStatus.PENDING, db_index=True)
    filters = models.JSONField(default=dict, blank=True)
    data = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    task_id = models.CharField(max_length=255, blank=True, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.get_report_type_display()} #{self.pk} ({self.status})"

    def mark_running(self) -> None:
        self.status, self.started_at, self.error = ReportStatus.RUNNING, timezone.now(), ""
        self.save(update_fields=["status", "started_at", "error"])

    def mark_completed(self, data: dict) -> None:
        self.status, self.data, self.completed_at = ReportStatus.COMPLETED, data, timezone.now()
        self.save(update_fields=["status", "data", "completed_at"])

    def mark_failed(self, error: str) -> None:
        self.status, self.error, self.completed_at = ReportStatus.FAILED, error, timezone.now()
        self.save(update_fields=["status", "error", "completed_at"])


class ScheduleType(models.TextChoices):
    INTERVAL = "interval"
    CRONTAB = "crontab"


class ScheduledTask(models.Model):
    """A periodic task as users think of it; it drives a django-celery-beat PeriodicTask.

    Always saved through app.services (save_scheduled_task and friends), which keep the
    PeriodicTask that beat reads in step, in the same transaction.
    """

    name = models.CharField(max_length=200, unique=True)
    task = models.CharField(
        max_length=255, db_index=True, help_text="Registered task name, e.g. app.tasks.health_check."
    )
    schedule_type = models.CharField(
        max_length=16, choices=ScheduleType.choices, default=ScheduleType.INTERVAL, db_index=True
    )
    interval_seconds = models.PositiveIntegerField(null=True, blank=True)
    crontab_minute = models.CharField(max_length=64, default="*")
    crontab_hour = models.CharField(max_length=64, default="*")
    crontab_day_of_week = models.CharField(max_length=64, default="*")
    crontab_day_of_month = models.CharField(max_length=64, default="*")
    crontab_month_of_year = models.CharField(max_length=64, default="*")
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    queue = models.CharField(max_length=255, blank=True, help_text="Empty: the task's own route.")
    enabled = models.BooleanField(default=True, db_index=True)
    description = models.TextField(blank=True)
    periodic_task = models.OneToOneField(
        PeriodicTask, null=True, blank=True, editable=False, on_delete=models.SET_NULL, related_name="scheduled_task"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def schedule_display(self) -> str:
        if self.schedule_type == ScheduleType.INTERVAL:
            return f"every {self.interval_seconds} s"
        fields = (
            self.crontab_minute,
            self.crontab_hour,
            self.crontab_day_of_month,
            self.crontab_month_of_year,
            self.crontab_day_of_week,
        )
        return "cron " + " ".join(fields)

    # Beat keeps these on the PeriodicTask; reading them there avoids a second copy.
    @property
    def last_run_at(self):
        return self.periodic_task.last_run_at if self.periodic_task else None

    @property
    def run_count(self) -> int:
        return self.periodic_task.total_run_count if self.periodic_task else 0


class TokenScope(models.TextChoices):
    """What a token may do; each scope includes the ones before it."""

    READ = "read", "read: task status, progress and overview"
    ENQUEUE = "enqueue", "enqueue: read, and start tasks"
    MANAGE = "manage", "manage: enqueue, and revoke any task"


TOKEN_SCOPE_ORDER = [TokenScope.READ, TokenScope.ENQUEUE, TokenScope.MANAGE]


class ApiToken(models.Model):
    """A bearer token for the API, held by a user. Only its SHA-256 digest is stored."""

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=8, help_text="First characters of the token, to recognise it.")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    # Null only for tokens made before tokens had owners (migration 0006).
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, related_name="api_tokens")
    scope = models.CharField(max_length=10, choices=TokenScope.choices, default=TokenScope.ENQUEUE)
    is_active = models.BooleanField(default=True, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Refused from then on; empty: never.")
    # Written at most once a minute per token and process (app/api_tokens.py), not per request.
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    @staticmethod
    def new_secret() -> str:
        return secrets.token_urlsafe(32)

    @staticmethod
    def digest_of(secret: str) -> str:
        # Tokens are 256 random bits, so a fast hash is enough: there is nothing to brute-force.
        return hashlib.sha256(secret.encode()).hexdigest()


class IdempotencyKey(models.Model):
    """An enqueue request's ``Idempotency-Key`` and the answer it got (app/idempotency.py): a
    retry with the same key and body gets that answer again and queues nothing."""

    # Keys are per token holder: "user:<id>", or "token:<id>" for a token without an owner.
    holder = models.CharField(max_length=40)
    key = models.CharField(max_length=255)
    # SHA-256 of the endpoint and the validated body: the same key with another body is refused.
    fingerprint = models.CharField(max_length=64)
    # The 202 answer's body; null while the first request runs.
    response = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["holder", "key"], name="unique_idempotency_key_per_holder")]

    def __str__(self) -> str:
        return f"{self.holder} {self.key}"
