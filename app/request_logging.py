"""Fields for django-structlog's request lines: method, path, status and duration on the
request_finished line, and the request id echoed in the X-Request-ID response header."""

import time

import structlog
from django.dispatch import receiver
from django_structlog import signals


def _request_id() -> str | None:
    return structlog.contextvars.get_contextvars().get("request_id")


def _duration_ms(request) -> float | None:
    started = getattr(request, "_log_started_at", None)
    return round((time.perf_counter() - started) * 1000, 3) if started is not None else None


@receiver(signals.bind_extra_request_metadata)
def remember_start(request, **_) -> None:
    request._log_started_at = time.perf_counter()


@receiver(signals.bind_extra_request_finished_metadata)
def add_finished_fields(request, response, log_kwargs, **_) -> None:
    # "status" replaces django-structlog's "code": the name the gunicorn access line uses too.
    log_kwargs.pop("code", None)
    log_kwargs.update(
        method=request.method, path=request.path, status=response.status_code, duration_ms=_duration_ms(request)
    )
    response["X-Request-ID"] = _request_id()


@receiver(signals.bind_extra_request_failed_metadata)
def add_failed_fields(request, log_kwargs, **_) -> None:
    log_kwargs.pop("code", None)
    log_kwargs.update(method=request.method, path=request.path, status=500, duration_ms=_duration_ms(request))


@receiver(signals.update_failure_response)
def echo_request_id_on_failure(response, **_) -> None:
    response["X-Request-ID"] = _request_id()
