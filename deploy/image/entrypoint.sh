#!/bin/sh
# One image, several roles: web | worker | beat | flower | migrate | manage ARGS...
# Each role execs its server, which becomes PID 1 and receives SIGTERM directly:
# gunicorn finishes requests in flight, the Celery worker finishes running tasks.
set -eu

role="${1:-web}"
[ "$#" -gt 0 ] && shift

runtime_dir="${APP_RUNTIME_DIR:-/tmp}"

# Celery runs Django's system checks at every worker, beat and flower start (a tenth of a second
# each). The migrate role runs them all once per rollout, before any of these start.
export CELERY_SKIP_CHECKS="${CELERY_SKIP_CHECKS:-1}"

case "$role" in
  web)
    exec gunicorn -c python:project.gunicorn_conf project.wsgi "$@"
    ;;
  worker)
    # Warm shutdown on SIGTERM: stop consuming, let running tasks finish. --quiet: no start-up
    # banner, which Celery prints outside logging (it would break the JSON log stream). Celery's
    # own worker command, without the `celery` group's plugins (project/celery_command.py).
    exec python -m project.celery_command --quiet worker \
      --queues "${CELERY_WORKER_QUEUES:-default,long}" \
      --hostname "${CELERY_WORKER_NAME:-worker}@%h" \
      --without-mingle --without-gossip --task-events \
      --loglevel "${CELERY_LOG_LEVEL:-INFO}" "$@"
    ;;
  beat)
    # The schedule lives in the database; the file only keeps beat's own state.
    exec python -m project.celery_command --quiet beat \
      --schedule "${CELERY_BEAT_SCHEDULE_FILE:-$runtime_dir/celerybeat-schedule}" \
      --loglevel "${CELERY_LOG_LEVEL:-INFO}" "$@"
    ;;
  flower)
    # Flower with no credentials, or half an OAuth setup, serves every page to anyone (a provider
    # without FLOWER_AUTH checks nobody): refuse to start rather than guess.
    refuse() {
      echo "flower: refusing to start $1" >&2
      exit 64
    }
    if [ -z "${FLOWER_BASIC_AUTH:-}" ] && [ -z "${FLOWER_AUTH_PROVIDER:-}" ] && [ -z "${FLOWER_AUTH:-}" ]; then
      refuse "without authentication. Set FLOWER_BASIC_AUTH=user:password, or OAuth: FLOWER_AUTH_PROVIDER, FLOWER_AUTH and FLOWER_OAUTH2_KEY/SECRET/REDIRECT_URI."
    fi
    if [ -n "${FLOWER_BASIC_AUTH:-}" ]; then
      # Comma-separated user:password pairs, neither part empty (no globbing of the passwords).
      old_ifs=$IFS IFS=','
      set -f
      for pair in $FLOWER_BASIC_AUTH; do
        case "$pair" in
          ?*:?*) ;;
          *) refuse "with an incomplete FLOWER_BASIC_AUTH: each comma-separated entry must be user:password, neither empty." ;;
        esac
      done
      set +f
      IFS=$old_ifs
    fi
    if [ -n "${FLOWER_AUTH_PROVIDER:-}" ] || [ -n "${FLOWER_AUTH:-}" ]; then
      missing=""
      for name in FLOWER_AUTH_PROVIDER FLOWER_AUTH FLOWER_OAUTH2_KEY FLOWER_OAUTH2_SECRET FLOWER_OAUTH2_REDIRECT_URI; do
        eval "value=\${$name:-}"
        [ -n "$value" ] || missing="$missing $name"
      done
      case "${FLOWER_AUTH_PROVIDER:-}" in
        *Okta*) [ -n "${FLOWER_OAUTH2_OKTA_BASE_URL:-}" ] || missing="$missing FLOWER_OAUTH2_OKTA_BASE_URL" ;;
      esac
      if [ -n "$missing" ]; then
        refuse "with an incomplete OAuth setting, missing:$missing (FLOWER_AUTH is the allowed e-mails, e.g. .*@example\\.com; without it a provider lets everyone in)."
      fi
    fi
    # Flower reads its other FLOWER_* variables itself (FLOWER_URL_PREFIX, FLOWER_PORT...). Its app
    # has the project's Celery settings without Django's models; /metrics needs credentials there, and
    # FLOWER_METRICS_PORT serves it alone for Prometheus (project/flower_app.py).
    exec python -m project.flower_app --address="${FLOWER_ADDRESS:-0.0.0.0}" --port="${FLOWER_PORT:-5555}" "$@"
    ;;
  migrate)
    exec python manage.py migrate_with_lock "$@"
    ;;
  manage)
    exec python manage.py "$@"
    ;;
  *)
    echo "unknown role '$role': use web, worker, beat, flower, migrate or manage ARGS..." >&2
    exit 64
    ;;
esac
