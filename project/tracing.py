"""Distributed traces with OpenTelemetry: off unless an OTLP endpoint is set.

Switched on by the standard variables: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), unless ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none``. Everything else is the SDK's own reading of the standard
variables: the sampler (``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``), headers, timeouts,
batching, ``OTEL_RESOURCE_ATTRIBUTES``. The service name is ``OTEL_SERVICE_NAME``, else
``django-celery-k8s-<role>`` (web, worker, beat).

What is traced: Django requests, Celery publishes and task runs (the trace context travels in
the task message, so a request, the tasks it starts, each chain step and chord callback and
every retry are one trace), psycopg queries and Redis commands. Every log line written inside
a span carries its ``trace_id`` and ``span_id`` (project/logging_config.py), and so do Sentry
events (project/sentry.py): logs, traces and errors join up.

Where each role starts it:
- web: the libraries are instrumented as the app is imported (project/wsgi.py; gunicorn imports
  it once in its master, so Django's middleware includes OpenTelemetry's), and each gunicorn
  worker starts its own exporter after the fork (project/gunicorn_conf.py): the exporter's
  thread would not survive a fork;
- worker: each pool process, as it starts (worker_process_init, project/celery.py);
- beat: as it starts (beat_init).

https://opentelemetry.io/docs/languages/sdk-configuration/general/
https://opentelemetry-python-contrib.readthedocs.io/en/latest/instrumentation/celery/celery.html
"""

import os

SERVICE_NAME_PREFIX = "django-celery-k8s"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_instrumented = False


def enabled(environ=os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(name) for name in ENDPOINT_VARIABLES)


def instrument() -> None:
    """Instrument Django, Celery, psycopg and Redis (once per process). Spans go to the global
    tracer provider once start_exporting has set it; none are recorded before."""
    global _instrumented
    if _instrumented:
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    DjangoInstrumentor().instrument()
    CeleryInstrumentor().instrument()
    PsycopgInstrumentor().instrument()
    RedisInstrumentor().instrument()
    _instrumented = True


def start_exporting(role: str) -> None:
    """This process's tracer provider, exporting over OTLP/HTTP in a background thread."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; what is passed here wins.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"{SERVICE_NAME_PREFIX}-{role}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def start(role: str) -> bool:
    """Instrument and export in this process when tracing is on; returns whether it is."""
    if not enabled():
        return False
    instrument()
    start_exporting(role)
    return True


def current_ids() -> dict[str, str]:
    """The current span's trace and span ids, as hex (as trace backends show them), or nothing
    outside a recorded span."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}
