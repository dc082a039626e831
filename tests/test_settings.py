"""Settings come from the environment and fail loudly when a secret is missing."""

import os
import subprocess
import sys

import pytest

from tests.processes import REPO_ROOT

SHOW_SETTINGS = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({'engine': s.DATABASES['default']['ENGINE'], 'cache': s.CACHES['default']['BACKEND'], "
    "'email': s.EMAIL_BACKEND, 'debug': s.DEBUG, 'hosts': s.ALLOWED_HOSTS, 'broker': s.CELERY_BROKER_URL, "
    "'soft': s.CELERY_TASK_SOFT_TIME_LIMIT, 'queue': s.CELERY_TASK_DEFAULT_QUEUE, 'conn_max_age': "
    "s.DATABASES['default']['CONN_MAX_AGE']}))"
)


def run_settings(**env):
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "DATABASE_", "CACHE_"))}
    clean |= {"DJANGO_SETTINGS_MODULE": "project.settings", **env}
    return subprocess.run(
        [sys.executable, "-c", SHOW_SETTINGS], cwd=REPO_ROOT, env=clean, capture_output=True, text=True
    )


@pytest.mark.subprocess
def test_secret_key_is_required_when_debug_is_off():
    result = run_settings()

    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required when DJANGO_DEBUG is off" in result.stderr


@pytest.mark.subprocess
def test_debug_runs_without_a_secret_key_on_local_defaults():
    import json

    result = run_settings(DJANGO_DEBUG="true", CELERY_BROKER_URL="redis://127.0.0.1:6390/0")

    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["engine"] == "django_prometheus.db.backends.sqlite3"
    assert values["cache"] == "django.core.cache.backends.locmem.LocMemCache"
    assert values["email"] == "django.core.mail.backends.console.EmailBackend"
    assert values["conn_max_age"] == 600


@pytest.mark.subprocess
def test_every_backend_is_chosen_by_url():
    import json

    result = run_settings(
        DJANGO_SECRET_KEY="s",
        DATABASE_URL="mysql://root@127.0.0.1:3306/test",
        CACHE_URL="redis://127.0.0.1:6379/3",
        EMAIL_URL="smtp://user:pw@mail.example.com:587/?tls=True",
        DJANGO_ALLOWED_HOSTS="api.example.com,.example.org",
        CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//",
        CELERY_TASK_SOFT_TIME_LIMIT="10",
        CELERY_DEFAULT_QUEUE="short",
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "engine": "django_prometheus.db.backends.mysql",
        "cache": "django.core.cache.backends.redis.RedisCache",
        "email": "django.core.mail.backends.smtp.EmailBackend",
        "debug": False,
        "hosts": ["api.example.com", ".example.org"],
        "broker": "amqp://guest:guest@127.0.0.1:5672//",
        "soft": 10,
        "queue": "short",
        "conn_max_age": 600,
    }


SHOW_SENTINEL_SETTINGS = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({'transport': s.CELERY_BROKER_TRANSPORT, 'broker': s.CELERY_BROKER_TRANSPORT_OPTIONS, "
    "'backend': s.CELERY_RESULT_BACKEND, 'results': s.CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS, "
    "'cache': s.CACHES['default'], 'no_prefetch': s.CELERY_WORKER_DISABLE_PREFETCH}))"
)


@pytest.mark.subprocess
def test_sentinel_urls_choose_the_sentinel_transport_results_and_cache_with_the_master_name():
    import json

    url = "sentinel://:secret@s1:26379/0;sentinel://:secret@s2:26379/0"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CACHE_", "RESULT_", "CELERY_"))}
    env = {
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_SECRET_KEY": "s",
        "CELERY_BROKER_URL": url,
        "CACHE_URL": url.replace("/0", "/2"),
        "REDIS_SENTINEL_MASTER_NAME": "tasks",
        "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
    }
    result = subprocess.run(
        [sys.executable, "-c", SHOW_SENTINEL_SETTINGS], cwd=REPO_ROOT, env=clean | env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)

    sentinels = {
        "master_name": "tasks",
        "sentinel_kwargs": {"socket_timeout": 5.0, "socket_connect_timeout": 5.0, "password": "sentinel-secret"},
    }
    assert values["transport"] == "app.redis_transport:SentinelTransport"
    assert values["broker"]["master_name"] == "tasks"
    assert values["broker"]["sentinel_kwargs"] == sentinels["sentinel_kwargs"]
    assert values["no_prefetch"] is True  # Redis' delivery settings hold through Sentinel too
    # The results on the broker's Redis, through the same Sentinels.
    assert values["backend"] == f"app.result_backend:SentinelStateBackend+{url}"
    assert values["results"] == sentinels
    assert values["cache"]["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    assert values["cache"]["LOCATION"] == [url.replace("/0", "/2")]  # one server: never split at ";"
    assert values["cache"]["OPTIONS"]["pool_class"] == "app.redis_sentinel.CachePool"
    assert values["cache"]["OPTIONS"]["master_name"] == "tasks"


@pytest.mark.subprocess
def test_a_malformed_sentinel_cache_url_fails_at_start_up():
    result = run_settings(DJANGO_SECRET_KEY="s", CACHE_URL="sentinel://;redis://other:6379/1")

    assert result.returncode != 0
    assert "not a sentinel://host:port[/db];sentinel://... URL" in result.stderr


@pytest.mark.subprocess
def test_soft_limit_must_be_below_hard_limit():
    result = run_settings(DJANGO_SECRET_KEY="s", CELERY_TASK_SOFT_TIME_LIMIT="400", CELERY_TASK_TIME_LIMIT="300")

    assert result.returncode != 0
    assert "CELERY_TASK_SOFT_TIME_LIMIT must be lower than CELERY_TASK_TIME_LIMIT" in result.stderr


SHOW_DELIVERY_SETTINGS = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({'cancel': s.CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS, "
    "'no_prefetch': s.CELERY_WORKER_DISABLE_PREFETCH, 'transport': s.CELERY_BROKER_TRANSPORT_OPTIONS, "
    "'backend_timeout': s.CELERY_REDIS_SOCKET_TIMEOUT}))"
)


def delivery_settings(**env) -> dict:
    import json

    clean = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "CELERY_"))}
    clean |= {"DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_DEBUG": "true", **env}
    result = subprocess.run(
        [sys.executable, "-c", SHOW_DELIVERY_SETTINGS], cwd=REPO_ROOT, env=clean, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.subprocess
def test_delivery_safety_settings_follow_the_broker():
    on_redis = delivery_settings(CELERY_BROKER_URL="redis://127.0.0.1:6390/0")
    assert (on_redis["cancel"], on_redis["no_prefetch"]) == (False, True)
    assert on_redis["transport"] == {  # no visibility_timeout: each worker derives its own
        "socket_timeout": 5.0,
        "health_check_interval": 5,
        "retry_on_timeout": True,
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
    }
    pool = delivery_settings(CELERY_BROKER_URL="redis://127.0.0.1:6390/0", WORKER_POOL_NAME="fast")
    assert (pool["transport"]["unacked_key"], pool["transport"]["unacked_index_key"]) == (
        "unacked:fast",
        "unacked_index:fast",
    )
    assert on_redis["backend_timeout"] == 5.0

    on_rabbitmq = delivery_settings(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//")
    assert (on_rabbitmq["cancel"], on_rabbitmq["no_prefetch"]) == (True, False)
    assert on_rabbitmq["transport"] == {"confirm_publish": True}  # publisher confirms


def test_the_connection_loss_warning_is_quiet_only_when_cancelling_is_off_on_purpose():
    import warnings
    from types import SimpleNamespace

    from celery.exceptions import CPendingDeprecationWarning
    from celery.worker.consumer.consumer import CANCEL_TASKS_BY_DEFAULT

    from app.task_logging import quiet_the_cancel_on_connection_loss_warning

    for cancel, expected in ((False, 0), (True, 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", category=CPendingDeprecationWarning)  # as Celery's set-up does
            conf = SimpleNamespace(worker_cancel_long_running_tasks_on_connection_loss=cancel)
            quiet_the_cancel_on_connection_loss_warning(conf=conf)
            warnings.warn(CANCEL_TASKS_BY_DEFAULT, CPendingDeprecationWarning, stacklevel=1)
            warnings.warn("another pending deprecation", CPendingDeprecationWarning, stacklevel=1)
        assert len(caught) == expected + 1


SHOW_QUEUE_SETTINGS = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "queues = getattr(s, 'CELERY_TASK_QUEUES', None) or []; "
    "print(json.dumps({'queues': {q.name: q.queue_arguments for q in queues}, "
    "'exchange': [getattr(s, 'CELERY_TASK_DEFAULT_EXCHANGE', None), getattr(s, 'CELERY_TASK_DEFAULT_EXCHANGE_TYPE', None)]}))"
)


def queue_settings(**env):
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "CELERY_", "RABBITMQ_"))}
    clean |= {"DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_DEBUG": "true", **env}
    return subprocess.run(
        [sys.executable, "-c", SHOW_QUEUE_SETTINGS], cwd=REPO_ROOT, env=clean, capture_output=True, text=True
    )


@pytest.mark.subprocess
def test_rabbitmq_task_queues_are_quorum_queues_with_a_delivery_limit_unless_classic_is_chosen():
    import json

    rabbitmq = "amqp://guest:guest@127.0.0.1:5672//"
    quorum = json.loads(queue_settings(CELERY_BROKER_URL=rabbitmq, CELERY_CANARY_QUEUES="default,long,reports").stdout)
    assert sorted(quorum["queues"]) == ["default", "long", "reports"]
    assert quorum["queues"]["reports"] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 20,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "reports.dead-letter",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert quorum["exchange"] == ["tasks", "topic"]
    limited = json.loads(queue_settings(CELERY_BROKER_URL=rabbitmq, RABBITMQ_DELIVERY_LIMIT="3").stdout)
    assert limited["queues"]["default"]["x-delivery-limit"] == 3

    classic = json.loads(queue_settings(CELERY_BROKER_URL=rabbitmq, RABBITMQ_QUEUE_TYPE="classic").stdout)
    assert classic == {"queues": {}, "exchange": [None, None]}  # Celery's defaults
    on_redis = json.loads(queue_settings(CELERY_BROKER_URL="redis://127.0.0.1:6390/0").stdout)
    assert on_redis["queues"] == {}

    for env, error in [
        ({"RABBITMQ_QUEUE_TYPE": "stream"}, "RABBITMQ_QUEUE_TYPE must be one of quorum, classic; got 'stream'."),
        ({"RABBITMQ_DELIVERY_LIMIT": "0"}, "RABBITMQ_DELIVERY_LIMIT must be at least 1; got 0."),
        ({"CELERY_CANARY_QUEUES": "default,eu.reports"}, "without dots; got 'eu.reports'."),
    ]:
        refused = queue_settings(CELERY_BROKER_URL=rabbitmq, **env)
        assert refused.returncode != 0
        assert error in refused.stderr


def test_celery_reads_the_settings_under_its_own_names_and_the_fixup_its_connection_reuse():
    from celery.fixups.django import DjangoWorkerFixup
    from django.conf import settings

    from project.celery import app

    assert app.conf.task_routes == settings.CELERY_TASK_ROUTES
    assert app.conf.worker_prefetch_multiplier == settings.CELERY_WORKER_PREFETCH_MULTIPLIER
    assert not app.conf.deprecated_settings  # no CDeprecationWarning per setting at worker start
    # Read by Celery's Django fixup under its full name: unset, every task would close the
    # database connections.
    assert DjangoWorkerFixup(app).db_reuse_max == settings.CELERY_DB_REUSE_MAX == 10_000


@pytest.mark.subprocess
def test_the_request_body_limit_comes_from_api_max_body_bytes():
    show = "import django; django.setup(); from django.conf import settings as s; "
    show += "print(s.API_MAX_BODY_BYTES, s.DATA_UPLOAD_MAX_MEMORY_SIZE)"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_DEBUG": "true"}

    def run(value: str):
        command = [sys.executable, "-c", show]
        return subprocess.run(
            command, cwd=REPO_ROOT, env={**env, "API_MAX_BODY_BYTES": value}, capture_output=True, text=True
        )

    assert run("4096").stdout.split() == ["4096", "4096"]
    refused = run("0")
    assert refused.returncode != 0
    assert "API_MAX_BODY_BYTES must be a positive number of bytes; got 0." in refused.stderr


@pytest.mark.subprocess
def test_a_rotated_secret_key_still_accepts_what_the_old_one_signed_while_it_is_a_fallback():
    def run(code: str, **env) -> subprocess.CompletedProcess:
        clean = {key: value for key, value in os.environ.items() if not key.startswith("DJANGO_")}
        clean |= {"DJANGO_SETTINGS_MODULE": "project.settings", **env}
        setup = "import django; django.setup(); from django.core import signing; "
        return subprocess.run(
            [sys.executable, "-c", setup + code], cwd=REPO_ROOT, env=clean, capture_output=True, text=True
        )

    old, new = "old-" + "o" * 50, "new-" + "n" * 50
    signed = run("print(signing.dumps('session'))", DJANGO_SECRET_KEY=old).stdout.strip()
    read = f"print(signing.loads({signed!r}))"

    rotated = run(read, DJANGO_SECRET_KEY=new, DJANGO_SECRET_KEY_FALLBACKS=f"{old},other")
    assert (rotated.returncode, rotated.stdout.strip()) == (0, "session"), rotated.stderr
    dropped = run(read, DJANGO_SECRET_KEY=new)
    assert dropped.returncode != 0
    assert "BadSignature" in dropped.stderr


@pytest.mark.subprocess
def test_no_word_about_a_missing_env_file_at_start_up():
    """A checkout without .env (as in the image): every process used to log that it found none."""
    code = "import logging; logging.basicConfig(level=logging.INFO); import django; django.setup()"
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "DATABASE_", "CACHE_"))}
    clean |= {"DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_DEBUG": "true"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=clean, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert not (REPO_ROOT / ".env").exists()
    assert "/.env" not in result.stderr


SHOW_RUNTIME_FILES = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps([s.PROMETHEUS_MULTIPROC_BASE_DIR, s.CELERY_WORKER_HEALTH_DIR, s.CELERY_BEAT_HEARTBEAT_FILE]))"
)


def runtime_files(**env) -> list[str]:
    import json

    clean = {key: value for key, value in os.environ.items() if key != "APP_RUNTIME_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", SHOW_RUNTIME_FILES],
        cwd=REPO_ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_DEBUG": "true", **env},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.subprocess
def test_runtime_files_default_inside_the_checkout_not_the_shared_temp_folder():
    runtime = REPO_ROOT / "var" / "runtime"

    assert runtime_files() == [
        str(runtime / "prometheus-multiproc"),
        str(runtime / "worker-health"),
        str(runtime / "beat-heartbeat"),
    ]


@pytest.mark.subprocess
def test_the_images_runtime_dir_holds_every_runtime_file():
    assert runtime_files(APP_RUNTIME_DIR="/tmp") == [  # the image sets /tmp (Dockerfile)
        "/tmp/prometheus-multiproc",
        "/tmp/worker-health",
        "/tmp/beat-heartbeat",
    ]


@pytest.mark.subprocess
def test_gunicorn_keeps_the_web_metrics_under_the_same_base_as_the_settings(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_BASE_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", "from project import gunicorn_conf; print(gunicorn_conf.WEB_METRICS_DIR)"],
        cwd=REPO_ROOT,
        env={**env, "APP_RUNTIME_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "prometheus-multiproc" / "web")
    assert runtime_files(APP_RUNTIME_DIR=str(tmp_path))[0] == str(tmp_path / "prometheus-multiproc")
