"""The JSON API (django-ninja): validated bodies, OpenAPI 3 at /api/openapi.json, docs at /api/docs.

Views are thin: validate, call app.workflows or app.selectors, shape the answer.
"""

import json
import logging

import redis
from celery.result import GroupResult
from django.db import DatabaseError
from django.http import HttpRequest
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from kombu.exceptions import OperationalError
from ninja import NinjaAPI, Status
from ninja.errors import HttpError
from ninja.openapi.docs import Swagger
from ninja.security import HttpBearer

import project
from app import api_errors, api_tokens, health, schemas, selectors, workflows
from app.idempotency import idempotent
from app.models import FINISHED_STATES, TokenScope
from project.celery import app as celery_app

logger = logging.getLogger(__name__)


class BearerToken(HttpBearer):
    """An active, unexpired API token whose scope includes `scope` (app/models.py TokenScope).
    No token or an unknown one: 401; expired: 401 saying so; a narrower scope: 403."""

    def __init__(self, scope: TokenScope):
        super().__init__()
        self.scope = scope.value

    def authenticate(self, request: HttpRequest, token: str):
        grant = selectors.api_token_grant(secret=token)
        if grant is None:
            return None
        if grant.expired(timezone.now()):
            raise HttpError(401, f"The API token {grant.name!r} expired at {grant.expires_at.isoformat()}.")
        if not grant.allows(self.scope):
            raise HttpError(
                403, f"The API token {grant.name!r} has the scope {grant.scope!r}; this needs {self.scope!r}."
            )
        api_tokens.note_used(grant)
        return grant


class LocalSwagger(Swagger):
    """Swagger UI from django-ninja's own template and static files (settings add both), never a
    CDN: django-ninja renders its local page only when it is an installed app."""

    def render_page(self, request, api, **kwargs):
        self.settings["url"] = self.get_openapi_url(api, kwargs)
        # Bearer tokens only: "Try it out" has no CSRF token to send.
        context = {"swagger_settings": json.dumps(self.settings, indent=1), "api": api, "add_csrf": False}
        return render(request, self.template, context)


api = NinjaAPI(
    title="Celery patterns API",
    version=project.__version__,
    description="Start Celery tasks of every pattern and watch them run. Every endpoint but the health "
    "checks and these docs needs `Authorization: Bearer <token>` (see `manage.py create_api_token`): a "
    "`read` token reads task status, progress and the overview, an `enqueue` token also starts tasks, a "
    "`manage` token also revokes them.",
    docs=LocalSwagger(),
    docs_url="/docs",
    openapi_url="/openapi.json",
    urls_namespace="api",
    parser=api_errors.StrictJsonParser(),
)

read_auth = BearerToken(TokenScope.READ)
enqueue_auth = BearerToken(TokenScope.ENQUEUE)
manage_auth = BearerToken(TokenScope.MANAGE)
# Every answer an endpoint can give, so the OpenAPI schema lists them all (README, "Errors").
REFUSED = {401: schemas.ErrorOut, 403: schemas.ErrorOut}
# A body: not JSON (400), no Content-Length (411), too large (413), not application/json (415),
# invalid (422); all refused before anything is queued.
BODY_ERRORS = {status: schemas.ErrorOut for status in (400, 411, 413, 415, 422)}
ENQUEUED = {202: schemas.EnqueuedOut, **REFUSED, 409: schemas.ErrorOut, 503: schemas.ErrorOut, **BODY_ERRORS}
# A task id: unknown (404), malformed (422); the result backend or database down (503).
TASK_READ_ERRORS = {**REFUSED, 404: schemas.ErrorOut, 422: schemas.ErrorOut, 503: schemas.ErrorOut}


@api.exception_handler(OperationalError)
def broker_unavailable(request, exc):
    logger.warning("broker unavailable: %s", exc)
    return api.create_response(
        request, {"detail": "The message broker is unavailable; nothing was queued. Retry later."}, status=503
    )


@api.exception_handler(redis.exceptions.ConnectionError)
@api.exception_handler(redis.exceptions.TimeoutError)
def result_backend_unavailable(request, exc):
    logger.warning("result backend unavailable: %s", exc)
    return api.create_response(
        request,
        {"detail": "The result backend is unavailable; task states cannot be read now. Retry later."},
        status=503,
    )


@api.exception_handler(DatabaseError)
def database_unavailable(request, exc):
    # Only a broken connection or server reaches here: the input checks keep what PostgreSQL
    # refuses (NUL, lone surrogates, oversize ids) out of every query.
    logger.warning("database error: %r", exc)
    return api.create_response(
        request, {"detail": "The database is unavailable; nothing was queued. Retry later."}, status=503
    )


def _enqueued(started: workflows.Started) -> Status:
    return Status(
        202,
        {
            "task_id": started.task_id,
            "status_url": f"/api/task-status/{started.task_id}/",
            "progress_url": f"/api/task-progress/{started.task_id}/",
            "task_ids": started.task_ids,
            "group_id": started.group_id,
            "report_id": started.report_id,
        },
    )


@api.post("/simple-task/", response=ENQUEUED, auth=enqueue_auth, tags=["patterns"], summary="add or multiply")
@idempotent
def simple_task(request, body: schemas.SimpleTaskIn):
    return _enqueued(workflows.start_simple(operation=body.operation, x=body.x, y=body.y))


@api.post(
    "/chain-tasks/", response=ENQUEUED, auth=enqueue_auth, tags=["patterns"], summary="step_1 -> step_2 -> step_3"
)
@idempotent
def chain_tasks(request, body: schemas.ChainIn):
    return _enqueued(workflows.start_chain(value=body.value))


@api.post("/group-tasks/", response=ENQUEUED, auth=enqueue_auth, tags=["patterns"], summary="tasks in parallel")
@idempotent
def group_tasks(request, body: schemas.GroupIn):
    pairs = [(pair.x, pair.y) for pair in body.pairs]
    return _enqueued(workflows.start_group(operation=body.operation, pairs=pairs))


@api.post(
    "/chord-tasks/", response=ENQUEUED, auth=enqueue_auth, tags=["patterns"], summary="parallel chunks + callback"
)
@idempotent
def chord_tasks(request, body: schemas.ChordIn):
    return _enqueued(workflows.start_chord(chunks=body.chunks))


@api.post("/long-task/", response=ENQUEUED, auth=enqueue_auth, tags=["patterns"], summary="progress or time limits")
@idempotent
def long_task(request, body: schemas.LongTaskIn):
    if body.kind == "time_limited":
        started = workflows.start_time_limited(
            duration=body.duration, soft_time_limit=body.soft_time_limit, time_limit=body.time_limit
        )
    else:
        started = workflows.start_long_running(total_steps=body.total_steps, step_seconds=body.step_seconds)
    return _enqueued(started)


@api.post("/retry-task/", response=ENQUEUED, auth=enqueue_auth, tags=["patterns"], summary="retries with backoff")
@idempotent
def retry_task(request, body: schemas.RetryTaskIn):
    return _enqueued(workflows.start_retry(fail_probability=body.fail_probability, fail_times=body.fail_times))


@api.post("/create-users/", response=ENQUEUED, auth=enqueue_auth, tags=["database"], summary="bulk, idempotent")
@idempotent
def create_users(request, body: schemas.CreateUsersIn):
    return _enqueued(workflows.start_create_users(count=body.count, prefix=body.prefix))


@api.post("/generate-report/", response=ENQUEUED, auth=enqueue_auth, tags=["reports"], summary="a Report row")
@idempotent
def generate_report(request, body: schemas.GenerateReportIn):
    filters = body.filters.model_dump(mode="json", exclude_none=True)
    return _enqueued(workflows.start_report(report_type=body.report_type, filters=filters))


def _not_found(task_id: str) -> Status:
    return Status(404, {"detail": f"Unknown task id {task_id!r}: no task with this id was ever queued here."})


@api.get(
    "/task-status/{task_id}/",
    response={200: schemas.TaskStatusOut, **TASK_READ_ERRORS},
    auth=read_auth,
    tags=["monitoring"],
)
def task_status(request, task_id: schemas.TaskId):
    state = selectors.task_state(task_id=task_id)
    if state is None:
        group = GroupResult.restore(task_id, app=celery_app)
        if group is None:
            return _not_found(task_id)
        return Status(200, _group_status(group))
    info = state.pop("info")
    if state["state"] not in FINISHED_STATES and info is not None:
        state["result"] = info  # PROGRESS: current, total, percent
    return Status(200, state)


def _group_status(group: GroupResult) -> dict:
    states = [child.state for child in group.results]
    if all(s == "SUCCESS" for s in states):
        state = "SUCCESS"
    elif any(s == "FAILURE" for s in states):
        state = "FAILURE"
    elif any(s != "PENDING" for s in states):
        state = "STARTED"
    else:
        state = "PENDING"
    return {
        "task_id": group.id,
        "task_name": "group",
        "state": state,
        "ready": group.ready(),
        "result": [child.result if child.successful() else None for child in group.results] if group.ready() else None,
        "children": [child.id for child in group.results],
    }


@api.get(
    "/task-progress/{task_id}/",
    response={200: schemas.TaskProgressOut, **TASK_READ_ERRORS},
    auth=read_auth,
    tags=["monitoring"],
)
def task_progress(request, task_id: schemas.TaskId):
    state = selectors.task_state(task_id=task_id)
    if state is None:
        return _not_found(task_id)
    info = state["info"] or (state.get("result") if isinstance(state.get("result"), dict) else None) or {}
    current, total, percent = info.get("current"), info.get("total"), info.get("percent")
    if state["state"] == "SUCCESS":
        percent = 100.0
    elif state["state"] == "PENDING":
        current, percent = 0, 0.0
    return Status(
        200, {"task_id": task_id, "state": state["state"], "current": current, "total": total, "percent": percent}
    )


@api.post(
    "/revoke-task/{task_id}/",
    response={202: schemas.RevokeOut, **TASK_READ_ERRORS, **BODY_ERRORS},
    auth=manage_auth,
    tags=["monitoring"],
)
def revoke_task(request, task_id: schemas.TaskId, body: schemas.RevokeBody):
    terminate = body.terminate
    if not selectors.is_known_task_id(task_id=task_id):
        return _not_found(task_id)
    workflows.revoke(task_ids=[task_id], terminate=terminate)
    return Status(202, {"task_id": task_id, "revoke_requested": True, "terminate": terminate})


@api.get("/", include_in_schema=False)
def index(request):
    """GET /api/ (and /api, which Django redirects here): where the API's pages are."""
    return {
        "docs": reverse("api:openapi-view"),
        "openapi": reverse("api:openapi-json"),
        "health": reverse("api:health_view"),
        "authentication": "Authorization: Bearer <token> on every endpoint but health and docs (README: API tokens)",
    }


@api.get("/health/", response={200: dict, 503: dict}, tags=["monitoring"], summary="dependency checks")
def health_view(request):
    report = health.run_checks()
    return Status(200 if report["healthy"] else 503, report)


@api.get(
    "/health/ready",
    response={200: dict, 503: dict},
    tags=["monitoring"],
    summary="readiness probe: the dependency checks, reused for a few seconds",
)
def health_ready(request):
    report = health.run_checks_cached()
    return Status(200 if report["healthy"] else 503, report)


@api.get("/health/live", response=dict, tags=["monitoring"], summary="liveness probe: the process answers")
def health_live(request):
    # Touches nothing outside this process: a database or broker outage must not restart web pods.
    return {"alive": True}


@api.get(
    "/task-overview/",
    response={200: dict, **REFUSED, 503: schemas.ErrorOut},
    auth=read_auth,
    tags=["monitoring"],
    summary="counts and durations from TaskLog",
)
def task_overview(request):
    return Status(200, selectors.task_overview())
