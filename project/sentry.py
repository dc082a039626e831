"""Error reporting to Sentry for the web, worker and beat processes (settings.py calls
init_sentry in each of them); nothing is set up without a DSN.

https://docs.sentry.io/platforms/python/integrations/django/
https://docs.sentry.io/platforms/python/integrations/celery/
"""

import logging

from project import tracing


def init_sentry(*, dsn: str, environment: str, release: str, traces_sample_rate: float) -> bool:
    """Start the SDK when a DSN is given; returns whether it did. Imported only then: the SDK
    and its HTTP client cost every process a twentieth of a second at start-up."""
    if not dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        release=release,
        traces_sample_rate=traces_sample_rate,
        # No user ids, IP addresses, cookies or request bodies leave the cluster.
        send_default_pii=False,
        before_send=with_trace_ids if tracing.enabled() else None,
        integrations=[
            DjangoIntegration(),
            # Beat's schedules become cron monitors: a missed or failed run raises an alert.
            CeleryIntegration(monitor_beat_tasks=True),
            # INFO and above as breadcrumbs, ERROR and above (with a traceback) as events.
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
    )
    return True


def with_trace_ids(event: dict, _hint) -> dict:
    """Tag an event with the OpenTelemetry trace and span it happened in (project/tracing.py):
    the trace id found in Sentry finds the trace and the log lines."""
    ids = tracing.current_ids()
    if ids:
        event.setdefault("tags", {}).update(ids)
    return event
