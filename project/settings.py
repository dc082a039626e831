"""Django settings, read only from the environment: every variable is declared, with its type,
default and help, in project/environment.py (the README's tables and .env.sample come from there)."""

import importlib.util
import logging
import os
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

import project
from app import redis_sentinel
from project import environment, logging_config, sentry, tls

BASE_DIR = Path(__file__).resolve().parent.parent

# A local .env is a convenience for development; the environment always wins. Read only when
# there is one: django-environ warns at every start (each role, each process) otherwise.
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

# --- Core -----------------------------------------------------------------

DEBUG = environment.read("DJANGO_DEBUG")
SECRET_KEY = environment.read("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is required when DJANGO_DEBUG is off. "
            "Set it to a long random string, or set DJANGO_DEBUG=true for local development."
        )
    SECRET_KEY = "insecure-development-key-never-use-in-production"  # noqa: S105 - DEBUG only
# Earlier keys, still accepted for what they signed (sessions, password-reset links) while
# DJANGO_SECRET_KEY is rotated; drop them once those have expired (README, "Security").
SECRET_KEY_FALLBACKS = environment.read("DJANGO_SECRET_KEY_FALLBACKS")

ALLOWED_HOSTS = environment.read("DJANGO_ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = environment.read("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    # Without autodiscovery: only the web's URLconf loads the admin modules (project/urls.py), so
    # workers, beat and flower start without them.
    "django.contrib.admin.apps.SimpleAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_celery_results",
    "django_celery_beat",
    "django_prometheus",
    "django_structlog",
    # Failed admin logins: counted per client address, locked out after AXES_FAILURE_LIMIT.
    "axes",
    "app",
]

MIDDLEWARE = [
    # Answers scrapes on the metrics listener before anything else (app/monitoring/web_metrics.py).
    "app.monitoring.web_metrics.MetricsListenerMiddleware",
    # django-prometheus: first and last, so its latency covers every other middleware.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Outside CommonMiddleware, so a request it redirects (/api -> /api/) is logged with the 301
    # it answered, not the 404 it turned into one; request_finished still carries the user id
    # (bound when the response passes back through).
    "django_structlog.middlewares.RequestMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # django-csp: the Content-Security-Policy header (CONTENT_SECURITY_POLICY below).
    "csp.middleware.CSPMiddleware",
    # django-axes: last but one, as its docs ask; answers a locked-out client with 429.
    "axes.middleware.AxesMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # After the metrics and request logs, so they count its refusals: an API request body it
    # will not read (411, 413, 415), and JSON, not HTML, for every error under /api/.
    "app.api_errors.ApiRequestGuard",
]

# The largest request body read (bytes): a larger one is refused before any view, 413 under /api/
# (app/api_errors.py). The default, Django's own, holds the largest chord the API takes (100,000
# numbers of up to about 24 characters each).
API_MAX_BODY_BYTES = environment.read("API_MAX_BODY_BYTES")
if API_MAX_BODY_BYTES < 1:
    raise ImproperlyConfigured(f"API_MAX_BODY_BYTES must be a positive number of bytes; got {API_MAX_BODY_BYTES}.")
# https://docs.djangoproject.com/en/5.2/ref/settings/#data-upload-max-memory-size
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES

# --- Security (README, "Security") ---------------------------------------------
# https://docs.djangoproject.com/en/5.2/ref/middleware/#module-django.middleware.security
# All off by default: `make run` serves plain http. The chart turns them on behind its TLS ingress,
# and `manage.py check --deploy` then reports nothing (tests/test_security.py).
#
# The header a TLS-terminating proxy sets to "https" (X-Forwarded-Proto for ingress-nginx); empty:
# none, a request is secure only when it reached gunicorn over TLS. gunicorn passes X-Forwarded-*
# headers on only from FORWARDED_ALLOW_IPS (project/gunicorn_conf.py), so a client cannot forge it.
_PROXY_SSL_HEADER = environment.read("DJANGO_SECURE_PROXY_SSL_HEADER")
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_" + _PROXY_SSL_HEADER.upper().replace("-", "_"), "https") if _PROXY_SSL_HEADER else None
)
SECURE_SSL_REDIRECT = environment.read("DJANGO_SECURE_SSL_REDIRECT")
# The kubelet probes web over plain http on the pod's port: its probe paths are never redirected.
SECURE_REDIRECT_EXEMPT = environment.read("DJANGO_SECURE_REDIRECT_EXEMPT")
# Sent only on secure requests. A year, with subdomains and preload, is what check --deploy and
# hstspreload.org ask for; start lower when trying TLS out (a browser keeps it for that long).
SECURE_HSTS_SECONDS = environment.read("DJANGO_SECURE_HSTS_SECONDS")
SECURE_HSTS_INCLUDE_SUBDOMAINS = environment.read("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS")
SECURE_HSTS_PRELOAD = environment.read("DJANGO_SECURE_HSTS_PRELOAD")
# Cookies sent over https only: on with the redirect unless set.
SESSION_COOKIE_SECURE = environment.read("DJANGO_SESSION_COOKIE_SECURE", default=SECURE_SSL_REDIRECT)
CSRF_COOKIE_SECURE = environment.read("DJANGO_CSRF_COOKIE_SECURE", default=SECURE_SSL_REDIRECT)

# Content-Security-Policy (django-csp 4): only this site's own scripts, styles, images and fonts
# (the admin and the Swagger UI at /api/docs need nothing else; swagger-ui draws its icons as data:
# images), no plugins, no framing, forms post only here. Flower sets its own (project/flower_app.py).
# https://django-csp.readthedocs.io/en/latest/configuration.html
DJANGO_CSP_REPORT_URI = environment.read("DJANGO_CSP_REPORT_URI")
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
        **({"report-uri": [DJANGO_CSP_REPORT_URI]} if DJANGO_CSP_REPORT_URI else {}),
    },
}

# Admin passwords: Django's validators (length 12 by default, not like the user's name, not a
# common password, not only digits). https://docs.djangoproject.com/en/5.2/topics/auth/passwords/
AUTH_PASSWORD_MIN_LENGTH = environment.read("AUTH_PASSWORD_MIN_LENGTH")
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": AUTH_PASSWORD_MIN_LENGTH},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# Failed logins (django-axes): AXES_FAILURE_LIMIT failures from one client address lock it out for
# AXES_COOLOFF_MINUTES (429), counting in the database, so every web pod sees the same count.
# https://django-axes.readthedocs.io/en/latest/4_configuration.html
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = environment.read("AXES_FAILURE_LIMIT")
AXES_COOLOFF_MINUTES = environment.read("AXES_COOLOFF_MINUTES")
AXES_COOLOFF_TIME = timedelta(minutes=AXES_COOLOFF_MINUTES)
AXES_LOCKOUT_PARAMETERS = ["ip_address"]
AXES_RESET_ON_SUCCESS = True
# No "AXES: BEGIN ..." line at every start of every process (lock-outs are still logged).
AXES_VERBOSE = False
# The client address (django-ipware): the right-most X-Forwarded-For entry, the address the proxy in
# front of gunicorn saw (entries to its left come from the client and can be forged), else the
# peer's address. gunicorn drops X-Forwarded-For from peers outside FORWARDED_ALLOW_IPS, and no
# other header (X-Real-IP...) is read.
AXES_IPWARE_PROXY_ORDER = "right-most"
AXES_IPWARE_META_PRECEDENCE_ORDER = ["HTTP_X_FORWARDED_FOR", "REMOTE_ADDR"]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

# django-ninja's Swagger UI template and files, served locally (app/api.py), never from a CDN. Not
# an installed app: that would import django-ninja and pydantic in every process, a tenth of a
# second of a worker's start.
NINJA_DIR = Path(importlib.util.find_spec("ninja").origin).parent

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # The project's own first: its overrides of the admin's and django-ninja's templates.
        "DIRS": [BASE_DIR / "project" / "templates", NINJA_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------

DATABASES = {"default": environ.Env.db_url_config(environment.read("DATABASE_URL"))}
# Persistent connections: measured here, a new connection per task makes the database
# result backend ~4x slower. Health checks drop a connection the server closed.
# https://docs.djangoproject.com/en/5.2/ref/databases/#persistent-connections
DATABASES["default"]["CONN_MAX_AGE"] = environment.read("DATABASE_CONN_MAX_AGE")
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# Celery's Django fixup closes every database connection before and after each task unless
# this is set; it then closes them only every N tasks. Between those, app/signals.py applies
# CONN_MAX_AGE and the health checks before each task, as Django does before each request.
CELERY_DB_REUSE_MAX = environment.read("CELERY_DB_REUSE_MAX")
_db_engine = DATABASES["default"]["ENGINE"]
if _db_engine.endswith("sqlite3"):
    # web, worker and beat share one file locally: WAL lets readers run beside a writer,
    # and IMMEDIATE transactions wait for the lock instead of failing mid-transaction.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE", "timeout": 20}
    )
elif _db_engine.endswith("mysql"):
    # PyMySQL is pure Python, so MySQL works without a C toolchain or client headers.
    import pymysql

    pymysql.install_as_MySQLdb()
# django_db_* metrics: django-prometheus' subclass of the same backend counts queries, errors and
# new connections; SQL, vendor and features are unchanged.
if _db_engine in {f"django.db.backends.{name}" for name in ("postgresql", "sqlite3", "mysql")}:
    DATABASES["default"]["ENGINE"] = _db_engine.replace("django.db.", "django_prometheus.db.")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis Sentinel (app/redis_sentinel.py; README, "Redis Sentinel") --------------------------
# A sentinel://host:26379/0;sentinel://host2:26379/0 URL in CELERY_BROKER_URL, RESULT_BACKEND_URL
# or CACHE_URL reaches the primary these Sentinels name, and the new one after a failover.
# https://redis.io/docs/latest/operate/oss_and_stack/management/sentinel/
REDIS_SENTINEL_MASTER_NAME = environment.read("REDIS_SENTINEL_MASTER_NAME")
# Only for Sentinels that ask for one (their requirepass); the primary's is in the URL.
REDIS_SENTINEL_PASSWORD = environment.read("REDIS_SENTINEL_PASSWORD")
# Seconds a command waits on a silent Redis connection: the broker, the results, and the
# Sentinels and primary of a sentinel:// cache.
REDIS_SOCKET_TIMEOUT = environment.read("REDIS_SOCKET_TIMEOUT")
SENTINEL_TRANSPORT_OPTIONS = redis_sentinel.transport_options(
    master_name=REDIS_SENTINEL_MASTER_NAME, password=REDIS_SENTINEL_PASSWORD, socket_timeout=REDIS_SOCKET_TIMEOUT
)
# A task publish through Sentinel returns once this many replicas have the message (Redis
# replicates after it answers; app/redis_transport.py: SentinelChannel).
REDIS_SENTINEL_WAIT_REPLICAS = environment.read("REDIS_SENTINEL_WAIT_REPLICAS")
REDIS_SENTINEL_WAIT_TIMEOUT = environment.read("REDIS_SENTINEL_WAIT_TIMEOUT")

# --- Cache ----------------------------------------------------------------

# redis://... selects Django's built-in Redis cache, sentinel://... the same through Sentinel;
# the default keeps it in process memory.
CACHE_URL = environment.read("CACHE_URL")
CACHES = {
    "default": redis_sentinel.cache_settings(
        CACHE_URL,
        master_name=REDIS_SENTINEL_MASTER_NAME,
        password=REDIS_SENTINEL_PASSWORD,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
    )
    if redis_sentinel.is_sentinel_url(CACHE_URL)
    else environ.Env.cache_url_config(CACHE_URL)
}

# --- Email ----------------------------------------------------------------

# consolemail:// prints mail; smtp://user:password@host:587/?tls=True sends it.
vars().update(environ.Env.email_url_config(environment.read("EMAIL_URL")))
DEFAULT_FROM_EMAIL = environment.read("DEFAULT_FROM_EMAIL")

# --- Internationalisation and static files ------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(environment.read("DJANGO_STATIC_ROOT"))
# The project's own (its icon), then django-ninja's Swagger UI files.
STATICFILES_DIRS = [BASE_DIR / "project" / "static", NINJA_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if DEBUG:
    # Development serves files straight from the apps, without a collectstatic step.
    STORAGES["staticfiles"]["BACKEND"] = "django.contrib.staticfiles.storage.StaticFilesStorage"

# --- Celery -----------------------------------------------------------------
# https://docs.celeryq.dev/en/stable/userguide/configuration.html

CELERY_BROKER_URL = environment.read("CELERY_BROKER_URL")
BROKER_IS_SENTINEL = redis_sentinel.is_sentinel_url(CELERY_BROKER_URL)
BROKER_IS_REDIS = CELERY_BROKER_URL.startswith(("redis://", "rediss://")) or BROKER_IS_SENTINEL
BROKER_IS_RABBITMQ = CELERY_BROKER_URL.startswith(("amqp://", "amqps://", "pyamqp://"))
# Where a task's live state is kept (app/result_backend.py): a redis:// or rediss:// URL (the
# broker's own when it is Redis), or django-db (the database, for a deployment without Redis:
# several database round trips per state). Each stored state also reaches TaskLog. Not named
# CELERY_RESULT_BACKEND: Celery reads that variable itself, and would bypass the history.
if "CELERY_RESULT_BACKEND" in os.environ:
    raise ImproperlyConfigured(
        "Set RESULT_BACKEND_URL, not CELERY_RESULT_BACKEND: Celery reads CELERY_RESULT_BACKEND directly "
        "and would store results without the task history."
    )
RESULT_BACKEND_URL = environment.read(
    "RESULT_BACKEND_URL", default=CELERY_BROKER_URL if BROKER_IS_REDIS else "django-db"
)
if RESULT_BACKEND_URL == "django-db":
    CELERY_RESULT_BACKEND = "app.result_backend:UpsertDatabaseBackend"
elif RESULT_BACKEND_URL.startswith(("redis://", "rediss://")):
    CELERY_RESULT_BACKEND = f"app.result_backend:RedisStateBackend+{RESULT_BACKEND_URL}"
elif redis_sentinel.is_sentinel_url(RESULT_BACKEND_URL):
    CELERY_RESULT_BACKEND = f"app.result_backend:SentinelStateBackend+{RESULT_BACKEND_URL}"
    CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = SENTINEL_TRANSPORT_OPTIONS
else:
    raise ImproperlyConfigured(
        f"RESULT_BACKEND_URL must be a redis://, rediss:// or sentinel:// URL, or django-db; got {RESULT_BACKEND_URL!r}."
    )
CELERY_CACHE_BACKEND = "django-cache"

# --- TLS to Redis and RabbitMQ (project/tls.py; README, "TLS to Redis and RabbitMQ") -------------
# Every rediss:// and amqps:// URL above (broker, result backend, cache) verifies its server
# against this CA bundle (empty: the system's CAs), and shows this client certificate if set. A
# rediss:// URL may carry ssl_* parameters instead; half a setting fails here, at start-up.
TLS_CA_FILE = environment.read("TLS_CA_FILE")
TLS_CERT_FILE = environment.read("TLS_CERT_FILE")
TLS_KEY_FILE = environment.read("TLS_KEY_FILE")
try:
    TLS_CLIENTS = tls.clients_for(
        {
            "CELERY_BROKER_URL": CELERY_BROKER_URL,
            "RESULT_BACKEND_URL": RESULT_BACKEND_URL,
            "CACHE_URL": CACHE_URL,
        },
        tls.TlsFiles(TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE),
    )
except ValueError as exc:
    raise ImproperlyConfigured(str(exc)) from None
if "CELERY_BROKER_URL" in TLS_CLIENTS:
    # kombu's connections (workers, beat's queue lengths and event watcher, the web's publishes)
    # and Flower's broker page.
    CELERY_BROKER_USE_SSL = TLS_CLIENTS["CELERY_BROKER_URL"].options()
if "RESULT_BACKEND_URL" in TLS_CLIENTS:
    CELERY_REDIS_BACKEND_USE_SSL = TLS_CLIENTS["RESULT_BACKEND_URL"].redis_options()
if "CACHE_URL" in TLS_CLIENTS:
    CACHES["default"].setdefault("OPTIONS", {}).update(TLS_CLIENTS["CACHE_URL"].redis_options())
# Name, args, worker, queue and retries in every stored state: the history is built from them.
CELERY_RESULT_EXTENDED = True
CELERY_RESULT_EXPIRES = environment.read("CELERY_RESULT_EXPIRES")
# No STARTED state for short tasks: measured, storing it costs a short task a second backend
# write and a tenth of a worker's throughput (README). Tasks that run for seconds (the long
# queue's) ask for it themselves (track_started); true stores it for every task.
CELERY_TASK_TRACK_STARTED = environment.read("CELERY_TASK_TRACK_STARTED")

# --- Task history (app/task_history.py, app/history_recorder.py) ------------------------------
# With a Redis result backend every stored state is appended to a stream, and a recorder folds
# it into TaskLog in batches. Beat runs one; manage.py record_task_history runs another.
TASK_HISTORY_RECORDER = environment.read("TASK_HISTORY_RECORDER")
# Entries per batch (one database transaction); seconds a read waits for new entries; seconds a
# short batch waits for more to gather (the history's lag for that saving); and seconds after
# which the entries a stopped recorder had read are taken over by a live one.
TASK_HISTORY_BATCH_SIZE = environment.read("TASK_HISTORY_BATCH_SIZE")
TASK_HISTORY_BLOCK_SECONDS = environment.read("TASK_HISTORY_BLOCK_SECONDS")
TASK_HISTORY_LINGER_SECONDS = environment.read("TASK_HISTORY_LINGER_SECONDS")
TASK_HISTORY_CLAIM_IDLE_SECONDS = environment.read("TASK_HISTORY_CLAIM_IDLE_SECONDS")

CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TIMEZONE = TIME_ZONE

# Time limits of a task that sets none: the default queue's short tasks. The long queue's tasks
# carry the long limits (app/tasks.py). Short limits keep the default pool's Redis visibility
# timeout, and so its redelivery after a dead worker, short (app/redelivery.py).
CELERY_TASK_SOFT_TIME_LIMIT = environment.read("CELERY_TASK_SOFT_TIME_LIMIT")
CELERY_TASK_TIME_LIMIT = environment.read("CELERY_TASK_TIME_LIMIT")
if CELERY_TASK_SOFT_TIME_LIMIT >= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured("CELERY_TASK_SOFT_TIME_LIMIT must be lower than CELERY_TASK_TIME_LIMIT.")
CELERY_LONG_TASK_SOFT_TIME_LIMIT = environment.read("CELERY_LONG_TASK_SOFT_TIME_LIMIT")
CELERY_LONG_TASK_TIME_LIMIT = environment.read("CELERY_LONG_TASK_TIME_LIMIT")
if CELERY_LONG_TASK_SOFT_TIME_LIMIT >= CELERY_LONG_TASK_TIME_LIMIT:
    raise ImproperlyConfigured("CELERY_LONG_TASK_SOFT_TIME_LIMIT must be lower than CELERY_LONG_TASK_TIME_LIMIT.")
# The longest wait between two retries (exponential backoff with jitter, app/tasks.py): a retry's
# message waits that long unacknowledged, so it counts towards the visibility timeout too.
CELERY_RETRY_BACKOFF_MAX = environment.read("CELERY_RETRY_BACKOFF_MAX")

CELERY_TASK_DEFAULT_QUEUE = environment.read("CELERY_DEFAULT_QUEUE")
CELERY_LONG_QUEUE = environment.read("CELERY_LONG_QUEUE")
# Long-running and report tasks get their own queue and workers, so they never delay short ones.
CELERY_TASK_ROUTES = {
    "app.tasks.long_running_task": {"queue": CELERY_LONG_QUEUE},
    "app.tasks.time_limited_task": {"queue": CELERY_LONG_QUEUE},
    "app.tasks.generate_report": {"queue": CELERY_LONG_QUEUE},
    "app.tasks.create_users_batch": {"queue": CELERY_LONG_QUEUE},
    "app.tasks.send_bulk_emails": {"queue": CELERY_LONG_QUEUE},
    "app.tasks.cleanup_old_users": {"queue": CELERY_LONG_QUEUE},
    "app.tasks.cleanup_task_logs": {"queue": CELERY_LONG_QUEUE},
}

# One message at a time per process: a long task never sits on prefetched short ones.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CONCURRENCY = environment.read("CELERY_WORKER_CONCURRENCY")
# Replace a pool process after this many tasks or once it holds this much memory (KiB):
# a leak in one task cannot grow a worker without bound. Measured on trivial tasks, a new pool
# process every 1,000 tasks cost 9% of throughput (the fork and start of a Django process);
# every 10,000 under 1%, and the memory cap still catches a leak.
CELERY_WORKER_MAX_TASKS_PER_CHILD = environment.read("CELERY_WORKER_MAX_TASKS_PER_CHILD")
CELERY_WORKER_MAX_MEMORY_PER_CHILD = environment.read("CELERY_WORKER_MAX_MEMORY_PER_CHILD")
# SIGTERM is a warm shutdown: consuming stops and running tasks finish. If a cold shutdown
# follows (a second signal), running tasks still get this many seconds.
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = environment.read("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT")
# Task events feed Flower. (No task-sent events: they would double the broker writes of
# every enqueue, and the publishing side is observed through signal handlers instead.)
CELERY_WORKER_SEND_TASK_EVENTS = True
# Keep Django's logging configuration: Celery must not replace the root logger.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Delivery safety (README, "Delivery guarantees"). When the broker connection drops, a running
# at-least-once task is cancelled on RabbitMQ, which redelivers its unacknowledged message at
# once: left running, it would run twice at the same time. On Redis its message stays in the
# unacknowledged set, and the run finishes and acknowledges over the new connection: nothing
# to cancel (and Celery's pending-deprecation warning about that choice is not logged:
# app/task_logging.py).
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = environment.read(
    "CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS", default=not BROKER_IS_REDIS
)
# Redis only (Celery ignores it on RabbitMQ, whose prefetch count already bounds it): a worker
# takes a message only when a pool process is free, so an at-most-once task (acknowledged on
# receipt) never waits behind a long one in a busy worker's buffer, and a killed worker held
# no more messages than it had processes.
CELERY_WORKER_DISABLE_PREFETCH = BROKER_IS_REDIS and environment.read("CELERY_WORKER_DISABLE_PREFETCH")

# Redis redelivers a message left unacknowledged this long (a worker died holding it). Empty:
# each worker derives it from the tasks of the queues it consumes (their longest hard limit plus
# the longest countdown, app/redelivery.py), so a dead default-pool worker's task runs again in
# under a minute. A value set here must exceed that, or the worker refuses to start.
CELERY_BROKER_VISIBILITY_TIMEOUT = environment.read("CELERY_BROKER_VISIBILITY_TIMEOUT")
# A worker pool's name (the chart sets it): on Redis each pool keeps its unacknowledged messages
# in keys of its own, so a pool with a short visibility timeout never redelivers the messages of
# a pool running longer tasks. Empty: kombu's shared keys.
WORKER_POOL_NAME = environment.read("WORKER_POOL_NAME")
# Seconds between two sweeps that put overdue unacknowledged messages back (kombu's default
# sweeps every 100 s: 10 s, on every 10th turn).
REDIS_RESTORE_INTERVAL = environment.read("REDIS_RESTORE_INTERVAL")
# A Redis broker that vanishes without closing the connection (failover, a NAT or firewall
# timeout) is noticed in seconds: a command waits at most REDIS_SOCKET_TIMEOUT (above), and an idle
# connection is checked every REDIS_HEALTH_CHECK_INTERVAL seconds (a stuck BRPOP is dropped after
# about 1 + 2 x that; kombu's default of 25 s gives 51 s). A timed-out command is retried once.
REDIS_HEALTH_CHECK_INTERVAL = environment.read("REDIS_HEALTH_CHECK_INTERVAL")
# RabbitMQ: every publish waits for the broker's confirm, so a 202 (or a chain's next step) means
# the broker has the message; without it a message sent just before a broker crash is lost
# silently. Its cost per publish: make bench (tests/benchmarks/publish_confirms.py, README).
CELERY_BROKER_CONFIRM_PUBLISH = environment.read("CELERY_BROKER_CONFIRM_PUBLISH")
# Redis: kombu's transport, with task messages in an outbox until a worker has written them down
# as unacknowledged, so a worker killed between its BRPOP and that write loses nothing
# (app/redis_transport.py).
if BROKER_IS_REDIS:
    CELERY_BROKER_TRANSPORT = f"app.redis_transport:{'SentinelTransport' if BROKER_IS_SENTINEL else 'Transport'}"
CELERY_BROKER_TRANSPORT_OPTIONS = {}
if BROKER_IS_RABBITMQ:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": CELERY_BROKER_CONFIRM_PUBLISH}
if BROKER_IS_REDIS:
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "socket_timeout": REDIS_SOCKET_TIMEOUT,
        "health_check_interval": REDIS_HEALTH_CHECK_INTERVAL,
        "retry_on_timeout": True,
        "unacked_restore_interval": REDIS_RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,
    }
    if BROKER_IS_SENTINEL:
        CELERY_BROKER_TRANSPORT_OPTIONS.update(
            SENTINEL_TRANSPORT_OPTIONS,
            wait_for_replicas=REDIS_SENTINEL_WAIT_REPLICAS,
            wait_for_replicas_timeout=REDIS_SENTINEL_WAIT_TIMEOUT,
        )
    if CELERY_BROKER_VISIBILITY_TIMEOUT is not None:
        CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] = CELERY_BROKER_VISIBILITY_TIMEOUT
    if WORKER_POOL_NAME:
        CELERY_BROKER_TRANSPORT_OPTIONS.update(
            unacked_key=f"unacked:{WORKER_POOL_NAME}",
            unacked_index_key=f"unacked_index:{WORKER_POOL_NAME}",
            unacked_mutex_key=f"unacked_mutex:{WORKER_POOL_NAME}",
        )
# The same for the Redis result backend (Celery's own default socket timeout is 120 s).
CELERY_REDIS_SOCKET_TIMEOUT = REDIS_SOCKET_TIMEOUT
CELERY_REDIS_RETRY_ON_TIMEOUT = True
CELERY_REDIS_BACKEND_HEALTH_CHECK_INTERVAL = REDIS_HEALTH_CHECK_INTERVAL
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# An API request must fail fast (503) when the broker is down, not hang.
CELERY_BROKER_CONNECTION_TIMEOUT = environment.read("CELERY_BROKER_CONNECTION_TIMEOUT")
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.3,
}
# A worker publishes too: the next step of a chain, a chord's callback, a retry. There nobody
# waits for an answer, and a publish that gives up loses the step (make chaos lost chord
# callbacks published while the broker restarted: Celery stores the chord as failed, or cannot
# even do that when the results live on the same Redis). So a worker retries a publish for up
# to CELERY_WORKER_PUBLISH_RETRY_SECONDS, once a second (app/signals.py). Keep it under the
# hard time limit.
CELERY_WORKER_PUBLISH_RETRY_SECONDS = environment.read("CELERY_WORKER_PUBLISH_RETRY_SECONDS")
WORKER_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": CELERY_WORKER_PUBLISH_RETRY_SECONDS,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1.0,
}

# django-celery-beat's DatabaseScheduler, plus a heartbeat file and metrics (app/monitoring/beat_scheduler.py).
CELERY_BEAT_SCHEDULER = "app.monitoring.beat_scheduler:DatabaseScheduler"

# --- Worker metrics (app/monitoring/metrics.py) ------------------------------------------
# Where the processes keep their writable runtime files (metrics, probe files, beat's
# heartbeat): var/runtime in the checkout, so two checkouts never share them; /tmp in the image,
# whose root filesystem is read-only.
APP_RUNTIME_DIR = Path(environment.read("APP_RUNTIME_DIR"))
# Port on which the worker's main process serves Prometheus metrics summed over its pool
# children; 0 turns the server off. Beat serves the cluster metrics on it.
CELERY_METRICS_PORT = environment.read("CELERY_METRICS_PORT")
# Base of the prometheus-client multiprocess directories: a worker uses <base>/worker, gunicorn
# <base>/web, each emptied when it starts, so no two workers (or two web servers) may share a
# base. Writable under a read-only root (the image: /tmp). Not PROMETHEUS_MULTIPROC_DIR itself:
# prometheus-client reads that in every process it is imported in (beat, flower, manage.py
# too) and fails on a missing folder; only the web and worker start-up set it, to their folder.
PROMETHEUS_MULTIPROC_BASE_DIR = environment.read("PROMETHEUS_MULTIPROC_BASE_DIR")

# --- Health probes ----------------------------------------------------------
# The worker's main process keeps its probe files here (app/monitoring/worker_health.py): "alive",
# "ready" and "canary"; the chart's exec probes only compare their age with the clock.
CELERY_WORKER_HEALTH_DIR = environment.read("CELERY_WORKER_HEALTH_DIR")
# Seconds between two writes of those files by the worker's event loop.
CELERY_WORKER_HEALTH_INTERVAL = environment.read("CELERY_WORKER_HEALTH_INTERVAL")
# Beat stores FAILURE (WorkerLostError) for the at-most-once tasks a worker was running once that
# worker has sent no event for this many seconds (app/lost_tasks.py); 0: never.
LOST_TASK_AFTER = environment.read("LOST_TASK_AFTER")
# A worker connected to the broker but not consuming from its queues (celery#10205: it stays
# connected, answers pings and takes nothing) is not ready at once, and after this many seconds
# no longer marked alive, so its liveness probe fails and Kubernetes restarts it. 0: never.
CELERY_WORKER_STUCK_AFTER = environment.read("CELERY_WORKER_STUCK_AFTER")
# The Consumer also marks the worker alive while it waits to reconnect to the broker.
CELERY_WORKER_CONSUMER = "app.monitoring.worker_health:Consumer"
# Canary: beat sends health_check to each of these queues every CELERY_CANARY_INTERVAL seconds
# (expiring after one interval); a worker with free slots whose last successful canary is
# older than CELERY_CANARY_STALE_AFTER seconds stops being ready (0: no canary is awaited, e.g. without beat).
CELERY_CANARY_QUEUES = environment.read("CELERY_CANARY_QUEUES", default=[CELERY_TASK_DEFAULT_QUEUE, CELERY_LONG_QUEUE])
CELERY_CANARY_INTERVAL = environment.read("CELERY_CANARY_INTERVAL")
CELERY_CANARY_STALE_AFTER = environment.read("CELERY_CANARY_STALE_AFTER", default=3 * CELERY_CANARY_INTERVAL)

# RabbitMQ task queues (app/rabbitmq_queues.py): quorum queues, replicated and counting each
# message's deliveries; a message returned more than RABBITMQ_DELIVERY_LIMIT times (its workers
# died holding it) goes to the queue's dead-letter queue. The default queue, the long queue and
# every canary queue (the chart names every pool's queues there) are declared so. classic:
# Celery's classic queues, no delivery limit (an existing classic queue cannot become a quorum
# queue in place: README, "Delivery guarantees").
RABBITMQ_QUEUE_TYPE = environment.read("RABBITMQ_QUEUE_TYPE")
RABBITMQ_DELIVERY_LIMIT = environment.read("RABBITMQ_DELIVERY_LIMIT")
TASK_QUEUE_NAMES = list(dict.fromkeys([CELERY_TASK_DEFAULT_QUEUE, CELERY_LONG_QUEUE, *CELERY_CANARY_QUEUES]))
if BROKER_IS_RABBITMQ:
    from app import rabbitmq_queues

    try:
        _rabbitmq_settings = rabbitmq_queues.celery_settings(
            TASK_QUEUE_NAMES,
            queue_type=RABBITMQ_QUEUE_TYPE,
            delivery_limit=RABBITMQ_DELIVERY_LIMIT,
        )
    except ValueError as exc:
        raise ImproperlyConfigured(str(exc)) from exc
    globals().update({f"CELERY_{name.upper()}": value for name, value in _rabbitmq_settings.items()})
# Seconds a web process reuses its last readiness result, so probes cannot stampede the database.
HEALTH_READY_CACHE_SECONDS = environment.read("HEALTH_READY_CACHE_SECONDS")
# Seconds a readiness request waits for the checks (they run in a thread of their own): a
# database that hangs makes web not ready, never ties up a gunicorn worker for longer.
HEALTH_READY_TIMEOUT_SECONDS = environment.read("HEALTH_READY_TIMEOUT_SECONDS")

# --- API ----------------------------------------------------------------------
# How long an enqueue answer is kept for a retry with the same Idempotency-Key (app/idempotency.py).
IDEMPOTENCY_KEY_TTL_SECONDS = environment.read("IDEMPOTENCY_KEY_TTL_SECONDS")
if IDEMPOTENCY_KEY_TTL_SECONDS < 60:
    raise ImproperlyConfigured(f"IDEMPOTENCY_KEY_TTL_SECONDS must be 60 or more, not {IDEMPOTENCY_KEY_TTL_SECONDS}.")

# --- Web and beat metrics (app/monitoring/web_metrics.py, app/monitoring/beat_scheduler.py) -------------------------
# gunicorn's second listener, serving only /metrics (project/gunicorn_conf.py); 0: none.
# The public port answers /metrics with 404.
WEB_METRICS_PORT = environment.read("WEB_METRICS_PORT")
# Touched by beat on every scheduler tick; beat's liveness probe reads its modification time.
CELERY_BEAT_HEARTBEAT_FILE = environment.read("CELERY_BEAT_HEARTBEAT_FILE")

# --- Cluster metrics (beat) ------------------------------------------------------------------
# Queue lengths and worker up/down come from beat alone (app/monitoring/cluster_metrics.py), served on
# CELERY_METRICS_PORT. Seconds between two reads of the queue lengths:
CELERY_EXPORTER_QUEUE_INTERVAL = environment.read("CELERY_EXPORTER_QUEUE_INTERVAL")
# Queues to measure besides the default queue, CELERY_TASK_QUEUES and those named by routes.
CELERY_EXPORTER_QUEUES = environment.read("CELERY_EXPORTER_QUEUES")
# Seconds without a heartbeat after which celery_worker_up is 0; 0: Celery's own rule, the one
# Flower uses (celery.events.state: twice the worker's heartbeat interval, 4 s by default).
CELERY_EXPORTER_WORKER_TIMEOUT = environment.read("CELERY_EXPORTER_WORKER_TIMEOUT") or None
# Seconds a down worker's 0 stays before its series is removed.
CELERY_EXPORTER_OFFLINE_WORKER_TTL = environment.read("CELERY_EXPORTER_OFFLINE_WORKER_TTL")

# --- Logging ----------------------------------------------------------------

# One configuration for Django, gunicorn (project/gunicorn_conf.py) and Celery (worker and beat
# apply it through app/task_logging.py): JSON lines, or readable text with LOG_FORMAT=console.
DJANGO_LOG_LEVEL = environment.read("DJANGO_LOG_LEVEL")
LOG_FORMAT = logging_config.log_format_from_environment()
# One line per task run (task_finished: state, duration, ids, queue, retries) unless this is on:
# then also Celery's own received/succeeded/retry lines and a task_started line per run.
LOG_CELERY_TASK_LINES = environment.read("LOG_CELERY_TASK_LINES")
LOGGING = logging_config.build(log_format=LOG_FORMAT, level=DJANGO_LOG_LEVEL, celery_task_lines=LOG_CELERY_TASK_LINES)
logging_config.configure_structlog()
# Python warnings (deprecations, Celery's running-as-root warning) as log lines, not raw stderr.
logging.captureWarnings(True)
# django-structlog: a request id on every line of a request, and on every line of the tasks it
# enqueues (carried in their headers, through chains and chord callbacks).
# https://django-structlog.readthedocs.io/en/latest/configuration.html
DJANGO_STRUCTLOG_CELERY_ENABLED = True
# The id from the X-Request-ID header (set by the ingress or the caller), else a new one.
DJANGO_STRUCTLOG_TRUST_UPSTREAM_REQUEST_ID = True
# The line per task end is app/task_logging.py's task_finished (with state and runtime); the
# publisher's task_enqueued and the worker's task_started lines only with LOG_CELERY_TASK_LINES
# (the request id on task_finished ties a task to its request).
DJANGO_STRUCTLOG_CELERY_TASK_SUCCESS_LOG_LEVEL = logging.DEBUG
DJANGO_STRUCTLOG_CELERY_TASK_START_LOG_LEVEL = logging.INFO if LOG_CELERY_TASK_LINES else logging.DEBUG

# --- Sentry (project/sentry.py) -----------------------------------------------
# Errors from web, worker and beat (with beat's schedules as cron monitors); off without a DSN.
SENTRY_DSN = environment.read("SENTRY_DSN")
SENTRY_ENVIRONMENT = environment.read("SENTRY_ENVIRONMENT")
SENTRY_RELEASE = environment.read("SENTRY_RELEASE", default=project.__version__)
# Share of requests and tasks traced for Sentry's performance view; 0: errors only.
SENTRY_TRACES_SAMPLE_RATE = environment.read("SENTRY_TRACES_SAMPLE_RATE")
sentry.init_sentry(
    dsn=SENTRY_DSN,
    environment=SENTRY_ENVIRONMENT,
    release=SENTRY_RELEASE,
    traces_sample_rate=SENTRY_TRACES_SAMPLE_RATE,
)
