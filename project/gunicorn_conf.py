"""gunicorn settings for the web role, each from an environment variable with a default.

Used as `gunicorn -c python:project.gunicorn_conf project.wsgi` (see deploy/image/entrypoint.sh).
https://docs.gunicorn.org/en/stable/settings.html
"""

import json
import os
import time

from gunicorn.glogging import Logger


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


bind = f"0.0.0.0:{_int('PORT', 8000)}"
workers = _int("WEB_CONCURRENCY", 2)
threads = _int("GUNICORN_THREADS", 1)
timeout = _int("GUNICORN_TIMEOUT", 30)
# On SIGTERM, requests in flight get this long to finish before workers are killed.
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = _int("GUNICORN_KEEPALIVE", 5)
# Recycle workers now and then (jittered, so they do not all restart together).
max_requests = _int("GUNICORN_MAX_REQUESTS", 1000)
max_requests_jitter = _int("GUNICORN_MAX_REQUESTS_JITTER", 100)
# The heartbeat file of each worker: in memory, and writable with a read-only root filesystem.
worker_tmp_dir = os.environ.get("GUNICORN_WORKER_TMP_DIR") or "/dev/shm"  # noqa: S108 - tmpfs by design
# gunicorn 25+ creates a control socket under $HOME by default; nothing uses it here.
control_socket_disable = True
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS") or "127.0.0.1,::1"
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL") or "info"


class JsonAccessLogger(Logger):
    """One JSON object per request on the access log: quotes in a path or user agent cannot
    break the line, and log pipelines parse it without a grok pattern."""

    def access(self, resp, req, environ, request_time):
        if not (self.cfg.accesslog or self.cfg.logconfig or self.cfg.syslog):
            return
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "logger": "gunicorn.access",
            "remote_addr": environ.get("REMOTE_ADDR"),
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"),
            "query": environ.get("QUERY_STRING") or None,
            "status": resp.status_code,
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "user_agent": environ.get("HTTP_USER_AGENT"),
            "request_id": environ.get("HTTP_X_REQUEST_ID"),
        }
        try:
            self.access_log.info(json.dumps(record))
        except Exception:
            self.exception("Failed to write an access log line")


logger_class = JsonAccessLogger
