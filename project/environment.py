"""Every environment variable the project reads: name, type, default and one line of help.

settings.py, gunicorn_conf.py, localrun.py, flower_app.py and logging_config.py read their
variables through read(); deploy/image/entrypoint.sh reads its own in shell, and is declared here
too (tests/test_environment_docs.py checks its defaults against these). The README's
configuration tables and .env.sample are generated from this list:

    python -m project.environment          rewrites them (make settings-docs)
    python -m project.environment --check  exits 1 when either is stale

An empty variable counts as unset, except text and lists with a literal default: for those the
empty value is a value (no CSP report address, no extra queues).
"""

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import environ

PROJECT_DIR = Path(__file__).resolve().parent.parent
README = PROJECT_DIR / "README.md"
ENV_SAMPLE = PROJECT_DIR / ".env.sample"
START, END = "<!-- environment:start -->", "<!-- environment:end -->"
KINDS = ("str", "bool", "int", "float", "list")
NOT_GIVEN = object()


@dataclass(frozen=True)
class Derived:
    """A default the docs describe in words: it depends on where the project runs, or on other
    settings. read() returns `value` when there is one; otherwise its caller passes the default."""

    text: str
    value: Any = NOT_GIVEN


@dataclass(frozen=True)
class InRuntimeDir:
    """A default inside APP_RUNTIME_DIR: `leaf` under it."""

    leaf: str

    @property
    def text(self) -> str:
        return f"`$APP_RUNTIME_DIR/{self.leaf}`"


@dataclass(frozen=True)
class Variable:
    name: str
    kind: str
    default: Any
    help: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")


@dataclass(frozen=True)
class Section:
    title: str
    variables: tuple[Variable, ...]
    note: str = ""


SECTIONS = (
    Section(
        "Django",
        (
            Variable("DJANGO_DEBUG", "bool", False, "Debug mode; never in production."),
            Variable(
                "DJANGO_SECRET_KEY",
                "str",
                Derived("none: required when `DJANGO_DEBUG` is off", ""),
                "Django's secret key; start-up fails with a clear error without it (debug mode uses a fixed "
                "development key).",
            ),
            Variable(
                "DJANGO_SECRET_KEY_FALLBACKS",
                "list",
                [],
                "Earlier secret keys, comma-separated, still accepted for what they signed while the key is "
                "rotated (see Security).",
            ),
            Variable(
                "DJANGO_ALLOWED_HOSTS",
                "list",
                ["localhost", "127.0.0.1", "[::1]"],
                "Comma-separated host names this site answers to.",
            ),
            Variable(
                "DJANGO_CSRF_TRUSTED_ORIGINS",
                "list",
                [],
                "Comma-separated origins (`https://host`) allowed to post forms.",
            ),
            Variable(
                "DJANGO_STATIC_ROOT",
                "str",
                Derived(
                    "`staticfiles` in the checkout (the image: `/app/staticfiles`)", str(PROJECT_DIR / "staticfiles")
                ),
                "Where collectstatic writes and whitenoise serves from.",
            ),
            Variable(
                "API_MAX_BODY_BYTES",
                "int",
                2_621_440,
                "The largest request body read, in bytes (2.5 MiB, Django's own default; at least 1); a larger one "
                "is answered 413 (JSON under `/api/`) before it is read. Also Django's `DATA_UPLOAD_MAX_MEMORY_SIZE`, "
                "so the admin's forms have the same limit. The default holds the largest chord the API takes "
                "(100,000 numbers of up to about 24 characters).",
            ),
            Variable(
                "IDEMPOTENCY_KEY_TTL_SECONDS",
                "int",
                86_400,
                "Seconds an enqueue answer is kept for a retry with the same `Idempotency-Key` (at least 60).",
            ),
        ),
    ),
    Section(
        "Security",
        (
            Variable(
                "DJANGO_SECURE_PROXY_SSL_HEADER",
                "str",
                Derived("none", ""),
                "The header in which a TLS-terminating proxy says `https` (`X-Forwarded-Proto`, set by the chart); "
                "gunicorn passes it on only from `FORWARDED_ALLOW_IPS`.",
            ),
            Variable(
                "DJANGO_SECURE_SSL_REDIRECT",
                "bool",
                False,
                "Redirect http to https, but the probe paths (`DJANGO_SECURE_REDIRECT_EXEMPT`); the chart turns it on "
                "behind a TLS ingress.",
            ),
            Variable(
                "DJANGO_SECURE_REDIRECT_EXEMPT",
                "list",
                [r"^api/health/(live|ready)$"],
                "Comma-separated path regexes never redirected (the kubelet probes over plain http).",
            ),
            Variable(
                "DJANGO_SECURE_HSTS_SECONDS",
                "int",
                0,
                "`Strict-Transport-Security` max-age on https responses; 0: no HSTS (the chart: a year behind TLS).",
            ),
            Variable(
                "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS",
                "bool",
                True,
                "HSTS covers subdomains (only with `DJANGO_SECURE_HSTS_SECONDS`).",
            ),
            Variable(
                "DJANGO_SECURE_HSTS_PRELOAD",
                "bool",
                True,
                "The HSTS preload directive (only with `DJANGO_SECURE_HSTS_SECONDS`).",
            ),
            Variable(
                "DJANGO_SESSION_COOKIE_SECURE",
                "bool",
                Derived("as `DJANGO_SECURE_SSL_REDIRECT`"),
                "The session cookie is sent over https only.",
            ),
            Variable(
                "DJANGO_CSRF_COOKIE_SECURE",
                "bool",
                Derived("as `DJANGO_SECURE_SSL_REDIRECT`"),
                "The CSRF cookie is sent over https only.",
            ),
            Variable(
                "DJANGO_CSP_REPORT_URI",
                "str",
                Derived("empty: no reports", ""),
                "Where browsers report Content-Security-Policy violations.",
            ),
            Variable(
                "AUTH_PASSWORD_MIN_LENGTH",
                "int",
                12,
                "Shortest password Django's validators accept (admin, `createsuperuser`, `changepassword`).",
            ),
            Variable(
                "AXES_FAILURE_LIMIT",
                "int",
                5,
                "Failed admin logins from one client address before it is locked out (429).",
            ),
            Variable(
                "AXES_COOLOFF_MINUTES",
                "int",
                15,
                "Minutes a locked-out address waits; `manage.py axes_reset` lifts every lock-out at once.",
            ),
        ),
    ),
    Section(
        "Logging and Sentry",
        (
            Variable(
                "DJANGO_LOG_LEVEL",
                "str",
                "INFO",
                "Root log level of web and gunicorn (worker and beat take theirs from `--loglevel`: "
                "`CELERY_LOG_LEVEL` in the image).",
            ),
            Variable(
                "LOG_FORMAT",
                "str",
                Derived("`console` when `DJANGO_DEBUG` is on, else `json`"),
                "`json`: one JSON object per line; `console`: readable text. Web, gunicorn, worker and beat alike.",
            ),
            Variable(
                "LOG_CELERY_TASK_LINES",
                "bool",
                False,
                "One `task_finished` line per task run; `true` adds Celery's own received/succeeded/retry lines, a "
                "`task_started` line and the publisher's `task_enqueued` line (measured: a tenth of a worker's "
                "throughput).",
            ),
            Variable(
                "SENTRY_DSN",
                "str",
                Derived("empty: Sentry off", ""),
                "Errors from web, worker and beat go to this Sentry project (see Logs and Sentry).",
            ),
            Variable("SENTRY_ENVIRONMENT", "str", "production", "The environment Sentry files events under."),
            Variable(
                "SENTRY_RELEASE",
                "str",
                Derived("the project's version (`project.__version__`)"),
                "The release Sentry files events under.",
            ),
            Variable(
                "SENTRY_TRACES_SAMPLE_RATE",
                "float",
                0.0,
                "Share of requests and tasks traced for Sentry's performance view (0 to 1); 0: errors only.",
            ),
        ),
    ),
    Section(
        "Traces (OpenTelemetry)",
        (
            Variable(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "str",
                Derived("empty: no traces", ""),
                "The OTLP/HTTP collector, e.g. `http://otel-collector:4318`; tracing is on when this (or "
                "`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.",
            ),
            Variable(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "str",
                Derived("empty: `OTEL_EXPORTER_OTLP_ENDPOINT`", ""),
                "The collector's traces URL itself (the SDK appends nothing to it); also turns tracing on.",
            ),
            Variable(
                "OTEL_SDK_DISABLED",
                "bool",
                False,
                "`true` turns tracing off although an endpoint is set.",
            ),
            Variable(
                "OTEL_TRACES_EXPORTER",
                "str",
                "otlp",
                "`none` turns tracing off although an endpoint is set.",
            ),
            Variable(
                "OTEL_SERVICE_NAME",
                "str",
                Derived("`django-celery-k8s-<role>` (web, worker, beat)", ""),
                "The service name on every span.",
            ),
        ),
        note="Every other `OTEL_*` variable (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_RESOURCE_ATTRIBUTES`, "
        "`OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`...) is read by the OpenTelemetry SDK itself, as "
        "https://opentelemetry.io/docs/languages/sdk-configuration/ documents it (see Traces).",
    ),
    Section(
        "Database, cache and e-mail",
        (
            Variable(
                "DATABASE_URL",
                "str",
                Derived("`sqlite:///db.sqlite3` in the checkout", f"sqlite:///{PROJECT_DIR / 'db.sqlite3'}"),
                "`sqlite:///path`, `postgres://user:password@host:5432/name` (psycopg 3) or "
                "`mysql://user:password@host:3306/name` (PyMySQL).",
            ),
            Variable(
                "DATABASE_CONN_MAX_AGE",
                "int",
                600,
                "Seconds a connection is reused between requests and tasks (health-checked first); 0: a new "
                "connection each time.",
            ),
            Variable(
                "CACHE_URL",
                "str",
                "locmemcache://",
                "`locmemcache://` (per process), `redis://host:6379/1` (Django's Redis cache), or the same through "
                "Sentinel: `sentinel://host:26379/1;sentinel://host2:26379/1` (see Redis Sentinel).",
            ),
            Variable(
                "EMAIL_URL",
                "str",
                "consolemail://",
                "`consolemail://` prints mail; `smtp://user:password@host:587/?tls=True` sends it.",
            ),
            Variable("DEFAULT_FROM_EMAIL", "str", "celery-demo@localhost", "The sender of the mail the tasks send."),
        ),
    ),
    Section(
        "Celery broker",
        (
            Variable(
                "CELERY_BROKER_URL",
                "str",
                "redis://127.0.0.1:6379/0",
                "Redis, Redis through Sentinel (`sentinel://host:26379/0;sentinel://host2:26379/0`) or RabbitMQ "
                "(`amqp://user:password@host:5672/vhost`); `rediss://` or `amqps://` over TLS.",
            ),
            Variable(
                "CELERY_BROKER_CONNECTION_TIMEOUT",
                "float",
                1.0,
                "Seconds a publish waits for the broker; the API answers 503 soon after.",
            ),
            Variable(
                "CELERY_WORKER_PUBLISH_RETRY_SECONDS",
                "int",
                20,
                "How long a worker retries a publish (a chain's next step, a chord's callback, a retry) while the "
                "broker is down or restarting, once a second; the web gives up after half a second and answers 503. "
                "Keep it under the hard time limit.",
            ),
            Variable(
                "CELERY_BROKER_VISIBILITY_TIMEOUT",
                "int",
                Derived(
                    "each worker derives it from its queues' tasks (50 s for the default queue, 380 s for the long one)",
                    None,
                ),
                "Redis: redelivery after this many seconds unacknowledged; a value that is set must exceed the longest "
                "hard limit of an at-least-once task plus `CELERY_RETRY_BACKOFF_MAX`, or the worker refuses to start "
                "(see Delivery guarantees).",
            ),
            Variable(
                "WORKER_POOL_NAME",
                "str",
                Derived("empty: kombu's shared keys", ""),
                "Redis: the worker pool's name (the chart sets it); each pool keeps its unacknowledged messages under "
                "keys of its own.",
            ),
            Variable(
                "REDIS_RESTORE_INTERVAL",
                "int",
                5,
                "Redis: seconds between two sweeps that put overdue unacknowledged messages back (kombu's default: 100).",
            ),
            Variable(
                "REDIS_SOCKET_TIMEOUT",
                "float",
                5.0,
                "Redis broker and result backend (and a `sentinel://` cache, and the Sentinels): seconds a command "
                "waits on a silent connection.",
            ),
            Variable(
                "REDIS_HEALTH_CHECK_INTERVAL",
                "int",
                5,
                "Redis broker and result backend: seconds between checks of an idle connection (a half-open one is "
                "dropped after about 11 s; kombu's default gives 51 s).",
            ),
            Variable(
                "REDIS_SENTINEL_MASTER_NAME",
                "str",
                "mymaster",
                "The primary's name in the Sentinels' configuration, for every `sentinel://` URL (broker, results, "
                "cache).",
            ),
            Variable(
                "REDIS_SENTINEL_PASSWORD",
                "str",
                Derived("none", ""),
                "The Sentinels' own password, only when they have `requirepass` (the primary's goes in the URLs).",
            ),
            Variable(
                "REDIS_SENTINEL_WAIT_REPLICAS",
                "int",
                1,
                "A task publish through Sentinel (the API's 202, a chain's next step) returns once this many "
                "replicas have the message (Redis's WAIT), so a failover right after it loses nothing; 0: never wait.",
            ),
            Variable(
                "REDIS_SENTINEL_WAIT_TIMEOUT",
                "float",
                1.0,
                "Seconds a publish waits for those replicas; past it (a replica is down) the message is sent with a "
                "warning and publishes stop waiting for 5 s.",
            ),
            Variable(
                "CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS",
                "bool",
                Derived("`true` on RabbitMQ, `false` on Redis"),
                "Cancel running at-least-once tasks when the broker connection drops (see Delivery guarantees).",
            ),
            Variable(
                "CELERY_WORKER_DISABLE_PREFETCH",
                "bool",
                True,
                "Redis only: a worker takes a message only when a pool process is free.",
            ),
            Variable(
                "CELERY_BROKER_CONFIRM_PUBLISH",
                "bool",
                True,
                "RabbitMQ only: publisher confirms, a publish returns once RabbitMQ has the message (its cost: see "
                "Delivery guarantees).",
            ),
            Variable(
                "RABBITMQ_QUEUE_TYPE",
                "str",
                "quorum",
                "RabbitMQ only: `quorum` declares the default, long and canary queues as quorum queues with a delivery "
                "limit and a dead-letter queue each, on the topic exchange `tasks` (countdowns wait in RabbitMQ); "
                "`classic`: Celery's classic queues. An existing queue cannot change type in place.",
            ),
            Variable(
                "RABBITMQ_DELIVERY_LIMIT",
                "int",
                20,
                "RabbitMQ quorum queues: returns of a message (rejected with requeue, or held by a worker that died) "
                "before it goes to `<queue>.dead-letter`; fixed when the queue is created.",
            ),
        ),
    ),
    Section(
        "TLS to Redis and RabbitMQ",
        (
            Variable(
                "TLS_CA_FILE",
                "str",
                Derived("empty: the system's CAs", ""),
                "The CA bundle (PEM) every `rediss://` and `amqps://` URL (broker, result backend, cache) checks its "
                "server's certificate and name against; not for `DATABASE_URL` (see TLS to Redis and RabbitMQ).",
            ),
            Variable(
                "TLS_CERT_FILE",
                "str",
                Derived("none", ""),
                "A client certificate (PEM) shown to those servers; needs `TLS_KEY_FILE`.",
            ),
            Variable(
                "TLS_KEY_FILE",
                "str",
                Derived("none", ""),
                "The client certificate's private key (PEM); needs `TLS_CERT_FILE`.",
            ),
        ),
        note="A `rediss://` URL may carry `ssl_cert_reqs`, `ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` "
        "parameters instead (`amqps://` URLs may not); never both. Start-up fails on half a setting or an untrusted "
        "server.",
    ),
    Section(
        "Task states and history",
        (
            Variable(
                "RESULT_BACKEND_URL",
                "str",
                Derived("`CELERY_BROKER_URL` when it is Redis, else `django-db`"),
                "Where task states live: a `redis://`, `rediss://` or `sentinel://` URL, or `django-db` (the database, "
                "for a deployment without Redis; see Task state and history). Never set `CELERY_RESULT_BACKEND`: "
                "Celery reads that variable itself and would bypass the history (start-up fails with a clear error).",
            ),
            Variable(
                "CELERY_RESULT_EXPIRES",
                "int",
                86_400,
                "Seconds task states are kept in the result backend; `task-status` then answers from the history.",
            ),
            Variable(
                "CELERY_TASK_TRACK_STARTED",
                "bool",
                False,
                "Store a STARTED state for every task; by default only the tasks of the `long` queue do "
                "(`track_started` on the task), so short ones cost one result write, not two.",
            ),
            Variable(
                "TASK_HISTORY_RECORDER",
                "bool",
                True,
                "Beat folds the result backend's history stream into TaskLog (a Redis result backend only; "
                "`manage.py record_task_history` runs more recorders).",
            ),
            Variable("TASK_HISTORY_BATCH_SIZE", "int", 500, "Stream entries per TaskLog transaction."),
            Variable("TASK_HISTORY_BLOCK_SECONDS", "float", 1.0, "Seconds a read waits for new entries."),
            Variable(
                "TASK_HISTORY_LINGER_SECONDS",
                "float",
                0.25,
                "Seconds a short batch waits for more entries (measured: a batch of one costs the recorder ten times "
                "the CPU per task of a full one).",
            ),
            Variable(
                "TASK_HISTORY_CLAIM_IDLE_SECONDS",
                "float",
                30.0,
                "Seconds after which the entries a stopped recorder read are taken over by a live one.",
            ),
        ),
    ),
    Section(
        "Tasks, queues and workers",
        (
            Variable(
                "CELERY_TASK_SOFT_TIME_LIMIT",
                "int",
                25,
                "Soft limit (s) of a task that sets none: the default queue's short tasks; must be below the hard one.",
            ),
            Variable("CELERY_TASK_TIME_LIMIT", "int", 30, "Hard limit (s) of a task that sets none."),
            Variable(
                "CELERY_LONG_TASK_SOFT_TIME_LIMIT",
                "int",
                300,
                "Soft limit (s) of the long queue's tasks (`LONG_LIMITS` in `app/tasks.py`); a progress task asked to "
                "run longer is refused (422).",
            ),
            Variable("CELERY_LONG_TASK_TIME_LIMIT", "int", 360, "Hard limit (s) of the long queue's tasks."),
            Variable(
                "CELERY_RETRY_BACKOFF_MAX",
                "int",
                15,
                "The longest wait (s) between two retries (exponential backoff with full jitter).",
            ),
            Variable("CELERY_DEFAULT_QUEUE", "str", "default", "Queue of short tasks (Celery's `task_default_queue`)."),
            Variable("CELERY_LONG_QUEUE", "str", "long", "Queue of long-running and report tasks."),
            Variable(
                "CELERY_WORKER_CONCURRENCY",
                "int",
                Derived("one per CPU core", None),
                "Pool processes per worker.",
            ),
            Variable(
                "CELERY_WORKER_MAX_TASKS_PER_CHILD",
                "int",
                10_000,
                "Tasks before a pool process is replaced (measured: every 1,000 cost trivial tasks 9% of throughput).",
            ),
            Variable(
                "CELERY_WORKER_MAX_MEMORY_PER_CHILD",
                "int",
                512_000,
                "KiB after which a pool process is replaced (the leak guard).",
            ),
            Variable(
                "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT",
                "float",
                0.0,
                "SIGTERM is a warm shutdown (running tasks finish); if a cold shutdown follows, running tasks still "
                "get this many seconds.",
            ),
            Variable(
                "CELERY_DB_REUSE_MAX",
                "int",
                10_000,
                "Tasks between forced reconnects of a worker's database connection; Celery closes it around every "
                "task unless this is set (0: do that). `DATABASE_CONN_MAX_AGE` still applies.",
            ),
            Variable(
                "CELERY_SKIP_CHECKS",
                "str",
                Derived("`1` in the image and under `make run`; unset elsewhere", ""),
                "Read by Celery: set, it skips Django's system checks at every worker, beat and Flower start; the "
                "migrate role (and `make run`'s bootstrap) runs them once.",
            ),
        ),
    ),
    Section(
        "Health probes",
        (
            Variable(
                "APP_RUNTIME_DIR",
                "str",
                Derived("`var/runtime` in the checkout (the image: `/tmp`)", str(PROJECT_DIR / "var" / "runtime")),
                "Where the processes keep their writable runtime files: metrics, probe files, beat's heartbeat and "
                "schedule file. Two checkouts (or a checkout and its tests) never share it.",
            ),
            Variable(
                "CELERY_WORKER_HEALTH_DIR",
                "str",
                InRuntimeDir("worker-health"),
                "The worker's probe files `alive`, `ready` and `canary` (see Health probes).",
            ),
            Variable(
                "CELERY_WORKER_HEALTH_INTERVAL",
                "float",
                5.0,
                "Seconds between two writes of those files by the worker's event loop.",
            ),
            Variable(
                "CELERY_WORKER_STUCK_AFTER",
                "int",
                120,
                "Seconds a worker may stay connected without consuming from its queues before it stops touching "
                "`alive` (its liveness fails and Kubernetes restarts it); 0: never.",
            ),
            Variable(
                "CELERY_CANARY_QUEUES",
                "list",
                Derived("the default and long queues"),
                "Queues beat sends the health_check canary to (the chart: every pool's queues).",
            ),
            Variable(
                "CELERY_CANARY_INTERVAL",
                "int",
                60,
                "Seconds between two canaries on each queue; each expires after one interval.",
            ),
            Variable(
                "CELERY_CANARY_STALE_AFTER",
                "int",
                Derived("3 x `CELERY_CANARY_INTERVAL` (180)"),
                "Seconds without a successful canary before a worker with free slots is not ready; 0: none awaited.",
            ),
            Variable(
                "LOST_TASK_AFTER",
                "int",
                60,
                "Seconds without any event from a worker (they send a heartbeat every 2 s) after which beat stores "
                "FAILURE (`WorkerLostError`) for the at-most-once runs it recorded; 0: never.",
            ),
            Variable(
                "CELERY_BEAT_HEARTBEAT_FILE",
                "str",
                InRuntimeDir("beat-heartbeat"),
                "Touched by beat on every scheduler tick; beat's liveness probe reads its age.",
            ),
            Variable(
                "HEALTH_READY_CACHE_SECONDS",
                "float",
                5.0,
                "Seconds a web process reuses its readiness checks (`/api/health/ready`).",
            ),
            Variable(
                "HEALTH_READY_TIMEOUT_SECONDS",
                "float",
                3.0,
                "Seconds a readiness request waits for the checks (run in a thread of their own) before answering 503.",
            ),
        ),
    ),
    Section(
        "Metrics",
        (
            Variable(
                "WEB_METRICS_PORT",
                "int",
                9808,
                "gunicorn's second listener, serving only `/metrics`; 0: none. The public port answers `/metrics` "
                "with 404.",
            ),
            Variable(
                "CELERY_METRICS_PORT",
                "int",
                9808,
                "The worker's Prometheus metrics port (main process, summed over pool children), and beat's (queue "
                "lengths, worker up/down, beat's own); 0 turns it off.",
            ),
            Variable(
                "PROMETHEUS_MULTIPROC_BASE_DIR",
                "str",
                InRuntimeDir("prometheus-multiproc"),
                "Base of the prometheus-client multiprocess folders: `<base>/worker` (a Celery worker) and "
                "`<base>/web` (gunicorn), each emptied when its server starts; one base per worker or web server on a "
                "host. Never set `PROMETHEUS_MULTIPROC_DIR` itself: prometheus-client reads it in every process and "
                "fails on a missing folder.",
            ),
            Variable(
                "CELERY_EXPORTER_QUEUE_INTERVAL",
                "float",
                5.0,
                "Seconds between two reads of the queue lengths by beat.",
            ),
            Variable(
                "CELERY_EXPORTER_QUEUES",
                "list",
                [],
                "Comma-separated queues beat measures besides the default queue, `CELERY_TASK_QUEUES` and the routed "
                "ones (`long`).",
            ),
            Variable(
                "CELERY_EXPORTER_WORKER_TIMEOUT",
                "float",
                Derived("0: Celery's rule, twice the worker's heartbeat interval (4 s)", 0.0),
                "Seconds without a heartbeat before `celery_worker_up` is 0.",
            ),
            Variable(
                "CELERY_EXPORTER_OFFLINE_WORKER_TTL",
                "float",
                3600.0,
                "Seconds a down worker's 0 is kept before its series is removed.",
            ),
            Variable(
                "FLOWER_METRICS_PORT",
                "int",
                Derived("0: none (the chart sets 9808)", 0),
                "Flower's `/metrics` alone, without credentials, for Prometheus (`project/flower_app.py`).",
            ),
        ),
    ),
    Section(
        "Web server (gunicorn, `project/gunicorn_conf.py`)",
        (
            Variable("PORT", "int", 8000, "The public port."),
            Variable("WEB_CONCURRENCY", "int", 2, "gunicorn worker processes."),
            Variable("GUNICORN_THREADS", "int", 1, "Threads per worker process."),
            Variable(
                "GUNICORN_TIMEOUT", "int", 30, "Seconds a silent worker is given before it is killed and replaced."
            ),
            Variable(
                "GUNICORN_GRACEFUL_TIMEOUT",
                "int",
                30,
                "On SIGTERM, seconds requests in flight get to finish before the workers are killed.",
            ),
            Variable("GUNICORN_KEEPALIVE", "int", 5, "Seconds an idle keep-alive connection is held open."),
            Variable(
                "GUNICORN_MAX_REQUESTS",
                "int",
                1000,
                "Requests after which a worker is replaced (plus up to `GUNICORN_MAX_REQUESTS_JITTER`, so they do not "
                "all restart together).",
            ),
            Variable("GUNICORN_MAX_REQUESTS_JITTER", "int", 100, "The random part of `GUNICORN_MAX_REQUESTS`."),
            Variable(
                "GUNICORN_WORKER_TMP_DIR",
                "str",
                "/dev/shm",  # noqa: S108 - tmpfs by design
                "Where each worker's heartbeat file is kept: in memory, writable with a read-only root filesystem.",
            ),
            Variable(
                "FORWARDED_ALLOW_IPS",
                "str",
                "127.0.0.1,::1",
                "The proxies (addresses or CIDR networks, comma-separated; `*` for any) trusted with `X-Forwarded-*` "
                "headers; gunicorn drops them from every other peer (see Security).",
            ),
            Variable("GUNICORN_LOG_LEVEL", "str", "info", "gunicorn's own log level."),
        ),
    ),
    Section(
        "Container roles (`deploy/image/entrypoint.sh`)",
        (
            Variable(
                "CELERY_WORKER_QUEUES",
                "str",
                "default,long",
                "The queues the worker role consumes, comma-separated.",
            ),
            Variable("CELERY_WORKER_NAME", "str", "worker", "The worker's node name, before `@<host name>`."),
            Variable("CELERY_LOG_LEVEL", "str", "INFO", "The worker's and beat's `--loglevel`."),
            Variable(
                "CELERY_BEAT_SCHEDULE_FILE",
                "str",
                InRuntimeDir("celerybeat-schedule"),
                "Beat's own state (the schedule itself lives in the database).",
            ),
            Variable("FLOWER_ADDRESS", "str", "0.0.0.0", "The address Flower listens on."),  # noqa: S104 - in a pod
            Variable("FLOWER_PORT", "int", 5555, "Flower's port (also `make run`'s, on 127.0.0.1)."),
            Variable(
                "FLOWER_BASIC_AUTH",
                "str",
                Derived(
                    "none: the flower role then needs OAuth or refuses to start; `make run` makes a new password each run",
                    "",
                ),
                "Flower's `user:password` pairs, comma-separated, neither part empty.",
            ),
            Variable(
                "FLOWER_AUTH_PROVIDER",
                "str",
                Derived("none", ""),
                "Flower's OAuth provider class; needs `FLOWER_AUTH`, `FLOWER_OAUTH2_KEY`, `FLOWER_OAUTH2_SECRET` and "
                "`FLOWER_OAUTH2_REDIRECT_URI` (Okta also `FLOWER_OAUTH2_OKTA_BASE_URL`), or the role refuses to start.",
            ),
            Variable(
                "FLOWER_AUTH",
                "str",
                Derived("none", ""),
                "The e-mails OAuth lets in, a regex such as `.*@example\\.com`; without it a provider lets everyone in.",
            ),
            Variable("FLOWER_OAUTH2_KEY", "str", Derived("none", ""), "The OAuth client id."),
            Variable("FLOWER_OAUTH2_SECRET", "str", Derived("none", ""), "The OAuth client secret."),
            Variable(
                "FLOWER_OAUTH2_REDIRECT_URI",
                "str",
                Derived("none", ""),
                "Flower's OAuth callback URL (`https://host/<prefix>/login`).",
            ),
            Variable(
                "FLOWER_OAUTH2_OKTA_BASE_URL",
                "str",
                Derived("none", ""),
                "The Okta organisation's URL (the Okta provider only).",
            ),
        ),
        note="Flower reads every other `FLOWER_*` variable itself, as its command-line options "
        "(`FLOWER_URL_PREFIX` behind an ingress path...): https://flower.readthedocs.io/en/latest/config.html",
    ),
    Section(
        "`make run` only (`project/localrun.py`)",
        (
            Variable(
                "LOCAL_VAR_DIR",
                "str",
                Derived("`var` in the checkout", str(PROJECT_DIR / "var")),
                "The embedded Redis's folder, beat's schedule file, and (its `runtime` folder) `APP_RUNTIME_DIR` "
                "unless that is set.",
            ),
            Variable(
                "LOCAL_REDIS_PORT",
                "int",
                6390,
                "Port of the embedded Redis, started when `CELERY_BROKER_URL` is empty.",
            ),
            Variable("WEB_PORT", "int", 8000, "gunicorn's port on 127.0.0.1."),
            Variable("LOCAL_WEB_METRICS_PORT", "int", 9810, "The web's metrics port on 127.0.0.1."),
            Variable("LOCAL_WORKER_METRICS_PORT", "int", 9808, "The worker's metrics port on 127.0.0.1."),
            Variable("LOCAL_BEAT_METRICS_PORT", "int", 9809, "Beat's metrics port on 127.0.0.1."),
        ),
        note="`make run` also reads `FLOWER_PORT` and `FLOWER_BASIC_AUTH` (above).",
    ),
)

VARIABLES = {variable.name: variable for section in SECTIONS for variable in section.variables}
_env = environ.Env()


def declared_default(name: str) -> Any:
    """The declared default of a variable whose default is a value (a literal, or a Derived with one)."""
    declared = VARIABLES[name].default
    if isinstance(declared, InRuntimeDir):
        return str(Path(read("APP_RUNTIME_DIR")) / declared.leaf)
    if isinstance(declared, Derived):
        if declared.value is NOT_GIVEN:
            raise TypeError(f"{name}'s default depends on other settings: its reader passes it")
        return declared.value
    return declared


def read(name: str, *, default: Any = NOT_GIVEN) -> Any:
    """The variable's value, parsed as its kind, else its default. `default` is given exactly when
    the declaration's default is a Derived without a value (it is computed from other settings)."""
    variable = VARIABLES[name]
    declared = variable.default
    needs_default = isinstance(declared, Derived) and declared.value is NOT_GIVEN
    if needs_default != (default is not NOT_GIVEN):
        raise TypeError(f"{name}: pass a default exactly when its declared default is computed by its reader")
    if not needs_default:
        default = declared_default(name)
    empty_is_a_value = variable.kind in ("str", "list") and not described(declared)
    raw = os.environ.get(name)
    if raw is None or (raw == "" and not empty_is_a_value):
        return default
    return getattr(_env, variable.kind)(name)


# --- The generated documentation --------------------------------------------------------------


def described(default: Any) -> bool:
    """Whether the docs describe this default in words rather than show it."""
    return isinstance(default, (Derived, InRuntimeDir))


def shown_default(variable: Variable) -> str:
    declared = variable.default
    if described(declared):
        return declared.text
    if declared in ("", []):
        return "empty"
    return f"`{literal(declared)}`"


def literal(value: Any) -> str:
    """The value as it is written in the environment."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def readme_tables() -> str:
    out = []
    for section in SECTIONS:
        out += [f"#### {section.title}", "", "| Variable | Default | Meaning |", "|---|---|---|"]
        for variable in section.variables:
            cells = (f"`{variable.name}`", shown_default(variable), variable.help)
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        if section.note:
            out += ["", section.note]
        out.append("")
    return "\n".join(out)


def comment(text: str) -> list[str]:
    return textwrap.wrap(text.replace("`", ""), width=98, initial_indent="# ", subsequent_indent="# ")


def env_sample() -> str:
    out = [
        "# Every environment variable the project reads, with its default. Copy to .env for local",
        "# overrides; real environment variables always win over .env.",
        "# Generated from project/environment.py: run `make settings-docs` after changing it.",
    ]
    for section in SECTIONS:
        out += ["", f"# --- {section.title.replace('`', '')} ---"]
        for variable in section.variables:
            if described(variable.default):
                out += comment(f"{variable.help} Default: {variable.default.text}.")
                out.append(f"# {variable.name}=")
            else:
                out += comment(variable.help)
                out.append(f"{variable.name}={literal(variable.default)}")
        if section.note:
            out += comment(section.note)
    return "\n".join(out) + "\n"


def with_readme_tables(readme: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"{README.name} needs the markers {START} and {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{readme_tables()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write README.md's configuration tables and .env.sample.")
    parser.add_argument("--check", action="store_true", help="exit 1 when either is not up to date")
    parser.add_argument("--root", type=Path, default=PROJECT_DIR, help="the checkout (default: this one)")
    args = parser.parse_args(argv)

    readme, sample = args.root / README.name, args.root / ENV_SAMPLE.name
    wanted = {readme: with_readme_tables(readme.read_text()), sample: env_sample()}
    stale = [path for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is stale: run `make settings-docs` (python -m project.environment)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
