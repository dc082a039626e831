"""The API's enqueue path against an empty JSON view, under the same gunicorn (the image's
settings: 2 sync workers, JSON logs, the same middleware), with wrk on loopback.

Requests per second of POST /api/simple-task/ (token check, validation, publish, the id recorded
as queued) and of GET /api/task-status/<id>/, each as a share of the empty view's, in alternating
rounds; the figure to read is the median ratio. Without wrk (Debian package `wrk`) a Python load
generator is used: its own CPU competes with the server on the same cores, so those ratios read
higher than wrk's.

    python -m tests.benchmarks.api_throughput --seconds 5 --rounds 3
"""

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from project.embedded import free_port, wait_for_port
from tests.benchmarks import harness

CONNECTIONS = 16
POST_BODY = json.dumps({"operation": "add", "x": 2, "y": 3})


def _wrk(url: str, seconds: float, script: Path | None) -> float:
    command = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds:g}s", *(["-s", str(script)] if script else []), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output:
        raise RuntimeError(f"errors under load:\n{output}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))


def _python_load(url: str, seconds: float, method: str, body: str | None, headers: dict) -> float:
    """Keep-alive connections in threads; requests completed per second."""
    host, port, path = re.match(r"http://([^:/]+):(\d+)(/.*)", url).groups()
    done, errors, deadline = [0], [0], time.monotonic() + seconds

    def load():
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        while time.monotonic() < deadline:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status >= 300:
                errors[0] += 1
            done[0] += 1
        conn.close()

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors[0]:
        raise RuntimeError(f"{errors[0]} errors under load on {url}")
    return done[0] / seconds


def measure(servers: harness.Servers, database_url: str, seconds: float, rounds: int) -> dict:
    import redis

    broker_url = servers.redis(12)
    redis.Redis.from_url(broker_url).flushdb()
    env = harness.base_env(
        database_url,
        broker_url,
        servers.workdir,
        CACHE_URL=servers.redis(11),
        DJANGO_SETTINGS_MODULE="tests.benchmarks.web_settings",
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        WEB_METRICS_PORT=0,
        GUNICORN_WORKER_TMP_DIR=tempfile.gettempdir(),
    )
    owner = f"bench-{time.monotonic_ns()}"

    def manage(*args: str) -> str:
        run = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=harness.REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return run.stdout.strip()

    manage(
        "shell",
        "-c",
        f"from django.contrib.auth import get_user_model; get_user_model().objects.create_user({owner!r})",
    )
    token = manage("create_api_token", owner, "--owner", owner)
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-c", "python:project.gunicorn_conf", "project.wsgi"]
    web = harness.Process([*command, "--bind", f"127.0.0.1:{port}"], env, servers.workdir / "web.log")
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    use_wrk = shutil.which("wrk") is not None
    script = servers.workdir / "post.lua"
    script.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{POST_BODY}'\n"
        + "".join(f"wrk.headers['{k}'] = '{v}'\n" for k, v in headers.items())
    )
    # Reads need the token too; the empty view gets the same request, so only the work differs.
    get_script = servers.workdir / "get.lua"
    get_script.write_text(f"wrk.headers['Authorization'] = '{headers['Authorization']}'\n")
    rates: dict[str, list[float]] = {"empty": [], "enqueue": [], "status": []}
    try:
        wait_for_port(port, timeout=30, process=web.popen)
        connection = http.client.HTTPConnection("127.0.0.1", port)
        connection.request("POST", "/api/simple-task/", body=POST_BODY, headers=headers)
        task_id = json.loads(connection.getresponse().read())["task_id"]
        targets = {
            "empty": (f"{base}/bench/empty/", get_script, "GET", None),
            "enqueue": (f"{base}/api/simple-task/", script, "POST", POST_BODY),
            "status": (f"{base}/api/task-status/{task_id}/", get_script, "GET", None),
        }
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for name, (url, lua, method, body) in targets.items():
                rate = _wrk(url, seconds, lua) if use_wrk else _python_load(url, seconds, method, body, headers)
                rates[name].append(rate)
        for name in rates:
            rates[name] = rates[name][1:]
    finally:
        web.stop()
    return {"rates": rates, "wrk": use_wrk}


def report(result: dict, seconds: float, rounds: int) -> list[str]:
    rates = result["rates"]
    loader = f"wrk -c{CONNECTIONS}" if result["wrk"] else "Python load generator (no wrk: ratios read high)"
    ratios = {
        name: harness.median([r / e for r, e in zip(rates[name], rates["empty"], strict=True)])
        for name in ("enqueue", "status")
    }
    return [
        f"API vs an empty JSON view: gunicorn 2 sync workers, {loader}, {seconds:.0f} s rounds; median of {rounds}",
        f"  empty JSON view:          {harness.median(rates['empty']):>7.0f} req/s",
        f"  POST /api/simple-task/:   {harness.median(rates['enqueue']):>7.0f} req/s   {ratios['enqueue']:.2f}x",
        f"  GET /api/task-status/ID/: {harness.median(rates['status']):>7.0f} req/s   {ratios['status']:.2f}x",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with harness.servers() as servers:
        database_url = harness.fresh_database(servers.database_url)
        print("\n".join(report(measure(servers, database_url, args.seconds, args.rounds), args.seconds, args.rounds)))


if __name__ == "__main__":
    main()
