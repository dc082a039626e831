"""A real Prometheus (the Debian package) on loopback for the observability tests: it scrapes
the processes under test with the chart's job names, evaluates rule files, and answers
PromQL over its HTTP API."""

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from project.embedded import stop_process
from tests.processes import require_process_marker
from tests.resources import free_port


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    return shutil.which("promtool")


@dataclass
class ScrapeTarget:
    job: str
    port: int
    path: str = "/metrics"
    basic_auth: tuple[str, str] | None = None

    def config(self, interval: str) -> dict:
        job = {
            "job_name": self.job,
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "metrics_path": self.path,
            "static_configs": [{"targets": [f"127.0.0.1:{self.port}"]}],
        }
        if self.basic_auth:
            job["basic_auth"] = {"username": self.basic_auth[0], "password": self.basic_auth[1]}
        return job


class PrometheusError(RuntimeError):
    pass


@dataclass
class PrometheusServer:
    workdir: Path
    targets: list[ScrapeTarget]
    rule_files: list[Path] = field(default_factory=list)
    interval: str = "1s"

    def start(self) -> "PrometheusServer":
        require_process_marker("Prometheus")
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed (Debian package `prometheus`)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [target.config(self.interval) for target in self.targets],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()

    def _get(self, path: str, **params) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400/422: a query that does not parse or evaluate
            body = json.load(error)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expression: str) -> list[dict]:
        """Instant query: the result vector (a scalar result comes back as one sample)."""
        data = self._get("/api/v1/query", query=expression)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] == "matrix":
            return [{"metric": series["metric"], "value": series["values"][-1]} for series in data["result"]]
        return data["result"]

    def value(self, expression: str) -> float | None:
        """The single value of an expression, or None when it returns nothing."""
        result = self.query(expression)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expression!r} returned {len(result)} series, not one")
        return float(result[0]["value"][1])

    def targets_health(self) -> dict[str, str]:
        data = self._get("/api/v1/targets")
        return {target["labels"]["job"]: target["health"] for target in data["activeTargets"]}

    def alerts(self) -> list[dict]:
        return self._get("/api/v1/alerts")["alerts"]

    def firing(self, alert_name: str) -> list[dict]:
        return [a for a in self.alerts() if a["labels"].get("alertname") == alert_name and a["state"] == "firing"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
