"""The Django admin: task history with re-run and revoke, reports, schedules and API tokens.

Task history and reports are written by workers, so they are read-only here; schedules and
tokens are saved through app.services so beat's PeriodicTask and token digests stay right.
"""

import datetime as dt
import json

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_permission_codename
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from kombu.exceptions import OperationalError

from app import services, workflows
from app.models import FINISHED_STATES, ApiToken, Report, ScheduledTask, TaskLog, TaskState


def badge(label: str, kind: str):
    """A coloured label; each kind's colour is in app/static/app/admin.css (grey when it has none)."""
    return format_html('<span class="badge badge-{}">{}</span>', kind.lower(), label)


def pretty_json(value):
    if value is None:
        return None
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def human_duration(value: dt.timedelta | None) -> str | None:
    """850 ms, 2.4 s, 3 min 5 s, 2 h 10 min."""
    if value is None:
        return None
    seconds = value.total_seconds()
    # Thresholds compare rounded values, so 0.9996 s reads "1.0 s", not "1000 ms".
    if round(seconds * 1000) < 1000:
        return f"{round(seconds * 1000)} ms"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


# --- Task history -----------------------------------------------------------------------------


class TaskLogChangeList(ChangeList):
    def get_queryset(self, request, exclude_parameters=None):
        # The list shows none of these, and a result or traceback can be tens of kB per row.
        return super().get_queryset(request, exclude_parameters).defer("args", "kwargs", "result", "traceback")


class ReadOnlyAdmin(admin.ModelAdmin):
    """For rows that record what workers did: an edited row would be a false history, and a
    row added here would have no task behind it (reports come from POST /api/generate-report/)."""

    def get_readonly_fields(self, request, obj=None):
        return flatten_fieldsets(self.fieldsets)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(TaskLog)
class TaskLogAdmin(ReadOnlyAdmin):
    # Narrow enough for a 1,400 px window beside the admin's menu and the filters. The queue (it
    # follows from the task's route) and the worker (a pod's hostname, the widest value) are on each
    # row's page; the queue filter and the search find rows by them.
    list_display = ("short_task_id", "short_task_name", "state_badge", "retries", "created", "duration_display")
    list_filter = ("state", "task_name", "queue")
    # Sorting only by indexed columns: the history table is the big one.
    sortable_by = ("short_task_id", "short_task_name", "state_badge", "created")
    # ^task_id: the list shows the first 8 characters, and pasting them finds the row.
    search_fields = ("^task_id", "task_name", "worker")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    list_per_page = 50
    # The unfiltered COUNT(*) over the whole history is the slowest query on a big table.
    show_full_result_count = False
    actions = ("rerun_failed", "revoke_running")
    fieldsets = (
        (None, {"fields": ("task_id", "task_name", "state_badge")}),
        (
            "Run",
            {"fields": ("worker", "queue", "retries", "created_at", "started_at", "finished_at", "duration_display")},
        ),
        ("Call", {"fields": ("args_json", "kwargs_json", "soft_time_limit", "time_limit")}),
        ("Outcome", {"fields": ("result_json", "exception", "traceback_text")}),
    )

    def get_changelist(self, request, **kwargs):
        return TaskLogChangeList

    def has_control_permission(self, request):
        # Re-run and revoke act on Celery, not on the row, so they ask for the model's change
        # permission, which this admin otherwise never uses.
        return request.user.has_perm(f"{self.opts.app_label}.{get_permission_codename('change', self.opts)}")

    @admin.display(description="Task id", ordering="task_id")
    def short_task_id(self, obj):
        return format_html('<code title="{}">{}</code>', obj.task_id, obj.task_id[:8])

    @admin.display(description="Task", ordering="task_name")
    def short_task_name(self, obj):
        # The function's name; the module (app.tasks) is on hover, in the filter and on the row's page.
        return format_html('<span title="{}">{}</span>', obj.task_name, obj.task_name.rpartition(".")[2])

    @admin.display(description="State", ordering="state")
    def state_badge(self, obj):
        return badge(obj.state, obj.state)

    @admin.display(description="Created", ordering="created_at")
    def created(self, obj):
        # To the second, and narrower than Django's "Dec. 7, 2026, 11:21 p.m.": the year is on hover
        # (the date hierarchy above the list names it too).
        created_at = timezone.localtime(obj.created_at)
        return format_html(
            '<span title="{}">{}</span>',
            date_format(created_at, "Y-m-d H:i:s T"),
            date_format(created_at, "M j, H:i:s"),
        )

    @admin.display(description="Duration", ordering="duration")
    def duration_display(self, obj):
        return human_duration(obj.duration)

    @admin.display(description="Args")
    def args_json(self, obj):
        return pretty_json(obj.args)

    @admin.display(description="Kwargs")
    def kwargs_json(self, obj):
        return pretty_json(obj.kwargs)

    @admin.display(description="Result")
    def result_json(self, obj):
        return pretty_json(obj.result)

    @admin.display(description="Traceback")
    def traceback_text(self, obj):
        # <pre> keeps the indentation that makes a traceback readable.
        return format_html("<pre>{}</pre>", obj.traceback) if obj.traceback else None

    @admin.action(description="Re-run selected failed tasks", permissions=["control"])
    def rerun_failed(self, request, queryset):
        failed = list(
            queryset.filter(state=TaskState.FAILURE).only(
                "task_name", "args", "kwargs", "queue", "time_limit", "soft_time_limit"
            )
        )
        skipped = queryset.exclude(state=TaskState.FAILURE).count()
        sent, broker_error = workflows.send_again(
            calls=[(row.task_name, row.args, row.kwargs, row.call_options()) for row in failed]
        )
        if broker_error is not None:
            self.message_user(
                request,
                f"Broker unavailable: re-sent {len(sent)} of {len(failed)} failed task(s) before the error "
                f"({broker_error}).",
                messages.ERROR,
            )
            return
        level = messages.SUCCESS if sent else messages.WARNING
        self.message_user(
            request, f"Re-sent {len(sent)} failed task(s); skipped {skipped} not in state FAILURE.", level
        )

    @admin.action(description="Revoke selected running tasks", permissions=["control"])
    def revoke_running(self, request, queryset):
        task_ids = list(queryset.exclude(state__in=FINISHED_STATES).values_list("task_id", flat=True))
        skipped = queryset.filter(state__in=FINISHED_STATES).count()
        if task_ids:
            try:
                workflows.revoke(task_ids=task_ids, terminate=True)
            except OperationalError as exc:
                self.message_user(request, f"Broker unavailable: nothing revoked ({exc}).", messages.ERROR)
                return
        level = messages.SUCCESS if task_ids else messages.WARNING
        self.message_user(
            request,
            f"Revoke sent for {len(task_ids)} task(s); skipped {skipped} not pending, started or retrying.",
            level,
        )


# --- Reports ------------------------------------------------------------------------------------


@admin.register(Report)
class ReportAdmin(ReadOnlyAdmin):
    list_display = ("id", "report_type", "status_badge", "task_id", "created_at", "completed_at")
    list_filter = ("report_type", "status")
    sortable_by = ("id", "report_type", "status_badge", "task_id", "created_at")
    search_fields = ("^task_id", "error")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    list_per_page = 50
    fieldsets = (
        ("What", {"fields": ("report_type", "filters_json")}),
        ("Status", {"fields": ("status_badge", "task_id", "error")}),
        ("Content", {"fields": ("data_json",)}),
        ("Timestamps", {"fields": ("created_at", "started_at", "completed_at")}),
    )

    @admin.display(description="Status", ordering="status")
    def status_badge(self, obj):
        return badge(obj.get_status_display(), obj.status)

    @admin.display(description="Filters")
    def filters_json(self, obj):
        return pretty_json(obj.filters)

    @admin.display(description="Data")
    def data_json(self, obj):
        return pretty_json(obj.data)


# --- Schedules ------------------------------------------------------------------------------------


class ScheduledTaskForm(forms.ModelForm):
    class Meta:
        model = ScheduledTask
        fields = (
            "name",
            "task",
            "description",
            "enabled",
            "args",
            "kwargs",
            "queue",
            "schedule_type",
            "interval_seconds",
            "crontab_minute",
            "crontab_hour",
            "crontab_day_of_week",
            "crontab_day_of_month",
            "crontab_month_of_year",
        )

    def clean(self):
        cleaned_data = super().clean()
        # Field errors first: validating a half-cleaned row would repeat them in other words.
        if not self.errors:
            # The instance's own PeriodicTask is not a form field; keep it, so its name is no clash.
            candidate = ScheduledTask(**cleaned_data, periodic_task_id=self.instance.periodic_task_id)
            # Raised as {field: message}, so each error lands on its field.
            services.validate_scheduled_task(candidate)
        return cleaned_data


@admin.register(ScheduledTask)
class ScheduledTaskAdmin(admin.ModelAdmin):
    form = ScheduledTaskForm
    list_display = ("name", "task", "schedule", "enabled_badge", "last_run", "runs", "updated_at")
    list_filter = ("enabled", "schedule_type", "task")
    search_fields = ("name", "task", "description")
    # last_run and runs read the linked PeriodicTask: one join instead of a query per row.
    list_select_related = ("periodic_task",)
    ordering = ("name",)
    list_per_page = 100
    actions = ("enable_selected", "disable_selected")
    readonly_fields = ("last_run", "runs", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "task", "description", "enabled")}),
        ("Call", {"fields": ("args", "kwargs", "queue")}),
        ("Schedule", {"fields": ("schedule_type",)}),
        ("Interval schedule", {"fields": ("interval_seconds",), "description": "Used when the type is interval."}),
        (
            "Crontab schedule",
            {
                "fields": (
                    "crontab_minute",
                    "crontab_hour",
                    "crontab_day_of_week",
                    "crontab_day_of_month",
                    "crontab_month_of_year",
                ),
                "description": "Used when the type is crontab; times are UTC.",
            },
        ),
        ("Runs", {"fields": ("last_run", "runs", "created_at", "updated_at")}),
    )

    @admin.display(description="Schedule")
    def schedule(self, obj):
        return obj.schedule_display

    @admin.display(description="Enabled", ordering="enabled")
    def enabled_badge(self, obj):
        return badge("Yes", "yes") if obj.enabled else badge("No", "no")

    @admin.display(description="Last run", ordering="periodic_task__last_run_at")
    def last_run(self, obj):
        return obj.last_run_at

    @admin.display(description="Runs", ordering="periodic_task__total_run_count")
    def runs(self, obj):
        return obj.run_count

    def save_model(self, request, obj, form, change):
        services.save_scheduled_task(obj)

    def delete_model(self, request, obj):
        services.delete_scheduled_task(obj)

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            for scheduled in queryset.select_related("periodic_task"):
                services.delete_scheduled_task(scheduled)

    @admin.action(description="Enable selected scheduled tasks", permissions=["change"])
    def enable_selected(self, request, queryset):
        self._set_enabled(request, queryset, enabled=True)

    @admin.action(description="Disable selected scheduled tasks", permissions=["change"])
    def disable_selected(self, request, queryset):
        self._set_enabled(request, queryset, enabled=False)

    def _set_enabled(self, request, queryset, *, enabled: bool) -> None:
        verb = "Enabled" if enabled else "Disabled"
        try:
            changed = services.set_scheduled_tasks_enabled(
                scheduled_tasks=queryset.select_related("periodic_task"), enabled=enabled
            )
        except ValidationError as exc:
            # All or nothing: the service runs in one transaction.
            self.message_user(request, f"Nothing changed: {'; '.join(exc.messages)}", messages.ERROR)
            return
        self.message_user(request, f"{verb} {changed} scheduled task(s).", messages.SUCCESS)


# --- API tokens -------------------------------------------------------------------------------------


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "owner", "scope", "is_active", "expires_at", "last_used_at", "created_at")
    list_filter = ("is_active", "scope")
    list_select_related = ("owner",)
    search_fields = ("name", "prefix", "owner__username")
    ordering = ("name",)
    list_per_page = 100
    autocomplete_fields = ("owner",)
    readonly_fields = ("prefix", "last_used_at", "created_at")

    def get_fields(self, request, obj=None):
        # The prefix exists only once the secret does, when the token is saved.
        editable = ("name", "owner", "scope", "is_active", "expires_at")
        return editable if obj is None else (*editable, "prefix", "last_used_at", "created_at")

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        form.base_fields["owner"].required = True  # null only for tokens older than owners
        return form

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        secret = services.issue_api_token(obj)
        # Only the digest is stored: this message is the one time anyone sees the secret.
        self.message_user(
            request,
            format_html(
                "Token “{}” created. Copy its secret now; it is not stored and will not be shown again: "
                "<code>{}</code>",
                obj.name,
                secret,
            ),
            messages.SUCCESS,
        )


# --- One schedule editor; no "add" for rows only Celery writes ------------------------------------
# Importing them registers django-celery-beat's and django-celery-results' own admin pages (the
# web's URLconf autodiscovers them in INSTALLED_APPS order, these first: imported here too, so the
# changes below never depend on that order).
from django_celery_beat import admin as beat_admin  # noqa: E402
from django_celery_results import admin as results_admin  # noqa: E402

# Beat runs what its PeriodicTask rows say, and Scheduled tasks above write them (app.services):
# editing them here too would change what beat runs behind the scheduled task's back.
for model in (
    beat_admin.PeriodicTask,
    beat_admin.IntervalSchedule,
    beat_admin.CrontabSchedule,
    beat_admin.SolarSchedule,
    beat_admin.ClockedSchedule,
):
    if admin.site.is_registered(model):
        admin.site.unregister(model)


class CeleryWrittenAdmin:
    """Rows the result backend writes (RESULT_BACKEND_URL=django-db): shown, never added by hand."""

    def has_add_permission(self, request):
        return False


for model, model_admin in (
    (results_admin.TaskResult, results_admin.TaskResultAdmin),
    (results_admin.GroupResult, results_admin.GroupResultAdmin),
):
    admin.site.unregister(model)
    admin.site.register(model, type(model_admin.__name__, (CeleryWrittenAdmin, model_admin), {}))
