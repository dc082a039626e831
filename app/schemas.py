"""Request and response bodies of the JSON API. Every bound here keeps one request from
flooding the workers; a value out of bounds gets a 422 naming the field."""

import datetime as dt
from typing import Literal

from django.conf import settings
from ninja import Field, Schema
from pydantic import model_validator

from app.models import ReportType

FiniteNumber = Field(..., allow_inf_nan=False, ge=-1e12, le=1e12)

MAX_GROUP_SIZE = 1_000
MAX_CHORD_CHUNKS = 1_000
MAX_CHUNK_SIZE = 1_000
MAX_CHORD_NUMBERS = 100_000


class Operands(Schema):
    x: float = FiniteNumber
    y: float = FiniteNumber


class SimpleTaskIn(Operands):
    operation: Literal["add", "multiply"] = "add"


class ChainIn(Schema):
    value: int = Field(..., ge=-1_000_000, le=1_000_000, description="Input of workflow_step_1.")


class GroupIn(Schema):
    operation: Literal["add", "multiply"] = "add"
    pairs: list[Operands] = Field(..., min_length=1, max_length=MAX_GROUP_SIZE)


class ChordIn(Schema):
    chunks: list[list[float]] = Field(
        ...,
        min_length=1,
        max_length=MAX_CHORD_CHUNKS,
        description=f"Each chunk at most {MAX_CHUNK_SIZE} numbers, {MAX_CHORD_NUMBERS} in all.",
    )

    @model_validator(mode="after")
    def bounded_chunks(self):
        for index, chunk in enumerate(self.chunks):
            if len(chunk) > MAX_CHUNK_SIZE:
                raise ValueError(f"chunks[{index}] has {len(chunk)} numbers; at most {MAX_CHUNK_SIZE} allowed")
            if any(value != value or value in (float("inf"), float("-inf")) for value in chunk):
                raise ValueError(f"chunks[{index}] holds a non-finite number")
        total = sum(len(chunk) for chunk in self.chunks)
        if total > MAX_CHORD_NUMBERS:
            raise ValueError(f"chunks hold {total} numbers; at most {MAX_CHORD_NUMBERS} allowed")
        return self


class LongTaskIn(Schema):
    kind: Literal["progress", "time_limited"] = Field(
        "progress", description="progress: long_running_task; time_limited: time_limited_task."
    )
    total_steps: int = Field(10, ge=1, le=1_000, description="progress: number of steps.")
    step_seconds: float = Field(1.0, ge=0, le=10, description="progress: seconds per step.")
    duration: float = Field(5.0, gt=0, le=600, description="time_limited: seconds of work to attempt.")
    soft_time_limit: float | None = Field(None, gt=0, le=3_600, description="time_limited: override (s).")
    time_limit: float | None = Field(None, gt=0, le=3_600, description="time_limited: hard limit override (s).")

    @model_validator(mode="after")
    def soft_below_hard(self):
        if self.soft_time_limit and self.time_limit and self.soft_time_limit >= self.time_limit:
            raise ValueError("soft_time_limit must be lower than time_limit")
        return self

    @model_validator(mode="after")
    def progress_within_its_time_limit(self):
        seconds, limit = self.total_steps * self.step_seconds, settings.CELERY_LONG_TASK_SOFT_TIME_LIMIT
        if self.kind == "progress" and seconds > limit:
            raise ValueError(
                f"total_steps x step_seconds is {seconds:g} s; the task's soft time limit is {limit} s "
                "(CELERY_LONG_TASK_SOFT_TIME_LIMIT)"
            )
        return self


class RetryTaskIn(Schema):
    fail_probability: float = Field(0.5, ge=0, le=1)
    fail_times: int | None = Field(None, ge=0, le=5, description="Fail exactly this many attempts first.")


class CreateUsersIn(Schema):
    count: int = Field(..., ge=1, le=10_000)
    prefix: str = Field(..., pattern=r"^[a-z0-9_]{1,20}$", description="Lower-case letters, digits, _.")


class ReportFilters(Schema):
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    task_name: str | None = Field(None, max_length=255)

    @model_validator(mode="after")
    def ordered(self):
        if self.since and self.until and self.since >= self.until:
            raise ValueError("since must be earlier than until")
        return self


class GenerateReportIn(Schema):
    report_type: ReportType
    filters: ReportFilters = Field(default_factory=ReportFilters)


class RevokeIn(Schema):
    terminate: bool = Field(False, description="Also kill the task if it is running (SIGTERM).")


class EnqueuedOut(Schema):
    task_id: str
    status_url: str
    progress_url: str
    task_ids: list[str]
    group_id: str | None = None
    report_id: int | None = None


class TaskStatusOut(Schema):
    task_id: str
    task_name: str | None
    state: str
    ready: bool
    result: object | None = None
    error: str | None = None
    worker: str | None = None
    queue: str | None = None
    retries: int | None = None
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    duration_seconds: float | None = None
    children: list[str] = []


class TaskProgressOut(Schema):
    task_id: str
    state: str
    current: int | None
    total: int | None
    percent: float | None


class RevokeOut(Schema):
    task_id: str
    revoke_requested: bool
    terminate: bool


class ErrorOut(Schema):
    detail: object
