"""TLS-only Redis and RabbitMQ servers of a test's own on loopback, with certificates the test makes
(openssl): a CA, the servers' certificate for 127.0.0.1 and localhost signed by it, a client
certificate signed by it, and a second CA that signed nothing here (the "wrong CA")."""

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from project.embedded import stop_process, wait_for_port
from tests.chaos.run import RABBITMQ_SERVER, RabbitMQServer
from tests.processes import require_process_marker
from tests.resources import free_port

REDIS_SERVER = Path("/usr/bin/redis-server")


class Unavailable(Exception):
    """A tool the TLS servers need is missing here: the tests skip with this reason."""


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> Certificates:
    if shutil.which("openssl") is None:
        raise Unavailable("the openssl command is missing: the TLS tests make their certificates with it")
    directory.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "wrong-ca"):
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", f"/CN=Test {ca}",
            "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=directory,
        )  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=directory,
        )  # fmt: skip
    return Certificates(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        wrong_ca=directory / "wrong-ca.crt",
    )


class TlsRedis:
    """redis-server on a free loopback port, TLS only (no plain port), asking every client for a
    certificate signed by the CA."""

    def __init__(self, certificates: Certificates, workdir: Path):
        self.port, self.workdir, self.certificates = free_port(), workdir, certificates
        self.process: subprocess.Popen | None = None

    def url(self, db: int) -> str:
        return f"rediss://127.0.0.1:{self.port}/{db}"

    def start(self) -> "TlsRedis":
        require_process_marker("a TLS Redis")
        if not REDIS_SERVER.exists():
            raise Unavailable(f"{REDIS_SERVER} is missing: the TLS tests need a redis-server built with TLS")
        self.workdir.mkdir(parents=True, exist_ok=True)
        certificates = self.certificates
        command = [
            str(REDIS_SERVER), "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certificates.server_cert), "--tls-key-file", str(certificates.server_key),
            "--tls-ca-cert-file", str(certificates.ca), "--tls-auth-clients", "yes",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        log_path = self.workdir / "redis.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout=10, process=self.process)
        except RuntimeError:
            if "tls" in log_path.read_text(errors="replace").lower():
                raise Unavailable(f"{REDIS_SERVER} was built without TLS: {log_path.read_text()[-300:]}") from None
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


class TlsRabbitMQ(RabbitMQServer):
    """A RabbitMQ node of the test's own (as the chaos run's), listening only for TLS, and asking
    clients for a certificate without requiring one (guest logs in with its password)."""

    def __init__(self, certificates: Certificates, workdir: Path):
        super().__init__(workdir)
        (self.workdir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    "listeners.tcp = none",
                    f"listeners.ssl.default = 127.0.0.1:{self.port}",
                    f"ssl_options.cacertfile = {certificates.ca}",
                    f"ssl_options.certfile = {certificates.server_cert}",
                    f"ssl_options.keyfile = {certificates.server_key}",
                    "ssl_options.verify = verify_peer",
                    "ssl_options.fail_if_no_peer_cert = false",
                    "",
                ]
            )
        )

    def url(self) -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> "TlsRabbitMQ":
        require_process_marker("a TLS RabbitMQ")
        if not RABBITMQ_SERVER.exists():
            raise Unavailable(f"{RABBITMQ_SERVER} is missing: install Debian's rabbitmq-server for the amqps:// tests")
        super().start()
        return self
