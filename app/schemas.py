"""Request and response bodies of the JSON API. Every bound here keeps one request from
flooding the workers; a value out of bounds gets a 422 naming the field.

Request bodies are strict: a number is a JSON number (not a boolean, not a string; an integer
where a float is declared is fine), a date a string, an object an object; unknown fields are
refused (a misspelt field would otherwise fall back to its default and queue a task nobody asked
for), and no string holds a NUL, which PostgreSQL cannot store.

Every request field has a default or an example: Swagger UI's "Try it out" fills a body from
them, and without either it would send the bounds (x = -1e12) or a random string."""

import datetime as dt
from typing import Annotated, Literal

from django.conf import settings
from ninja import Body, Field, Path, Schema
from pydantic import BeforeValidator, ConfigDict, field_validator, model_validator

from app.models import ReportType

# Celery's ids (task, group, chain: the last step's) are UUIDs, but a task sent with an id of
# its own may use any short token: letters, digits and "_.:@+=-", starting with a letter or a
# digit (never "." or ".."), at most TaskLog.task_id's 255 characters. Nothing else can have
# been handed out here, so anything else is refused (422) before it reaches a store.
TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,254}$"
TaskId = Annotated[
    str,
    Path(
        ...,
        pattern=TASK_ID_PATTERN,
        max_length=255,
        description="A task or group id handed out by this API (a UUID), or any id of that form.",
    ),
]


def storable_text(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold it (pydantic itself refuses lone surrogates).
    if "\x00" in value:
        raise ValueError("must not contain a NUL character (\\u0000)")
    return value


def _json_string(value: object) -> object:
    # Lax pydantic reads a number as a Unix time: a surprise a client should hear about.
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time string")
    return value


def _whole_number(value: object) -> object:
    # JSON has one number type: 3.0 is the integer 3 (JSON Schema agrees); 3.5 stays a float,
    # which the strict int refuses, as it refuses a boolean or a string.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


DateTimeString = Annotated[dt.datetime, BeforeValidator(_json_string)]
Integer = Annotated[int, BeforeValidator(_whole_number), Field(strict=True)]
StrictFiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-1e12, le=1e12)]


class InputSchema(Schema):
    """A request body: an object with no unknown fields (ninja's Schema would also read a list or
    null as an object whose fields are all missing), every string storable."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def strings_are_storable(cls, value):
        if isinstance(value, str):
            storable_text(value)
        return value


MAX_GROUP_SIZE = 1_000
MAX_CHORD_CHUNKS = 1_000
MAX_CHUNK_SIZE = 1_000
MAX_CHORD_NUMBERS = 100_000


class Operands(InputSchema):
    x: FiniteNumber = Field(examples=[2])
    y: FiniteNumber = Field(examples=[3])


class SimpleTaskIn(Operands):
    operation: Literal["add", "multiply"] = "add"


class ChainIn(InputSchema):
    value: Integer = Field(..., ge=-1_000_000, le=1_000_000, description="Input of workflow_step_1.", examples=[10])


class GroupIn(InputSchema):
    operation: Literal["add", "multiply"] = "add"
    pairs: list[Operands] = Field(
        ..., min_length=1, max_length=MAX_GROUP_SIZE, examples=[[{"x": 1, "y": 2}, {"x": 3, "y": 4}, {"x": 5, "y": 6}]]
    )


class ChordIn(InputSchema):
    chunks: list[Annotated[list[StrictFiniteFloat], Field(max_length=MAX_CHUNK_SIZE)]] = Field(
        ...,
        min_length=1,
        max_length=MAX_CHORD_CHUNKS,
        description=f"Each chunk at most {MAX_CHUNK_SIZE} numbers, {MAX_CHORD_NUMBERS} in all.",
        examples=[[[1, 2, 3], [4, 5, 6], [7, 8, 9]]],
    )

    @model_validator(mode="after")
    def bounded_chunks(self):
        total = sum(len(chunk) for chunk in self.chunks)
        if total > MAX_CHORD_NUMBERS:
            raise ValueError(f"chunks hold {total} numbers; at most {MAX_CHORD_NUMBERS} allowed")
        return self


class LongTaskIn(InputSchema):
    kind: Literal["progress", "time_limited"] = Field(
        "progress", description="progress: long_running_task; time_limited: time_limited_task."
    )
    total_steps: Integer = Field(10, ge=1, le=1_000, description="progress: number of steps.")
    step_seconds: float = Field(1.0, strict=True, ge=0, le=10, description="progress: seconds per step.")
    duration: float = Field(5.0, strict=True, gt=0, le=600, description="time_limited: seconds of work to attempt.")
    # With the default duration (5 s): a partial result at the soft limit, before the hard one.
    soft_time_limit: float | None = Field(
        None, strict=True, gt=0, le=3_600, description="time_limited: override (s).", examples=[3]
    )
    time_limit: float | None = Field(
        None, strict=True, gt=0, le=3_600, description="time_limited: hard limit override (s).", examples=[4]
    )

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


class RetryTaskIn(InputSchema):
    fail_probability: float = Field(0.5, strict=True, ge=0, le=1)
    # The bounds before the validator: after it, or on the union, they would reach the OpenAPI
    # schema as pydantic's own "ge"/"le", not JSON Schema's minimum/maximum.
    fail_times: Annotated[int, Field(strict=True, ge=0, le=5), BeforeValidator(_whole_number)] | None = Field(
        None, description="Fail exactly this many attempts first.", examples=[2]
    )


class CreateUsersIn(InputSchema):
    count: Integer = Field(..., ge=1, le=10_000, examples=[10])
    prefix: str = Field(
        ..., pattern=r"^[a-z0-9_]{1,20}$", description="Lower-case letters, digits, _.", examples=["demo"]
    )


class ReportFilters(InputSchema):
    # Open-ended by example: one date to show the format; a null bound filters nothing.
    since: DateTimeString | None = Field(None, examples=["2026-01-01T00:00:00Z"])
    until: DateTimeString | None = Field(None, examples=[None])
    task_name: str | None = Field(None, max_length=255, examples=["app.tasks.add"])

    @model_validator(mode="after")
    def ordered(self):
        if self.since and self.until and self.since >= self.until:
            raise ValueError("since must be earlier than until")
        return self


class GenerateReportIn(InputSchema):
    report_type: ReportType
    filters: ReportFilters = Field(default_factory=ReportFilters)


class RevokeIn(InputSchema):
    terminate: bool = Field(False, strict=True, description="Also kill the task if it is running (SIGTERM).")


# Optional: no body means the defaults; a JSON null is not an object, so it is refused like [].
RevokeBody = Annotated[RevokeIn, Body(default_factory=RevokeIn)]


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
