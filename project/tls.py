"""TLS to Redis and RabbitMQ: how every client of a rediss:// or amqps:// URL connects, and the
start-up check that ends a role whose servers it can never trust.

The CA bundle and an optional client certificate come from TLS_CA_FILE, TLS_CERT_FILE and
TLS_KEY_FILE (the chart mounts them from a Secret), or, on a rediss:// URL only, from the URL's own
ssl_* parameters (kombu and Celery read those, py-amqp does not); never both. Each client gets the
same options: kombu (broker_use_ssl), the Redis result backend (redis_backend_use_ssl), Django's
cache and the API tokens' client (the cache's OPTIONS), Flower's broker page (broker_use_ssl).
The server's certificate and name are always checked, against the system's CAs when no CA is
given, unless a rediss:// URL says ssl_cert_reqs=none. Half a setting raises ValueError, which
the settings turn into ImproperlyConfigured.
"""

import os
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

DEFAULT_PORTS = {"rediss": 6379, "amqps": 5671}
PLAIN_SCHEMES = {"redis", "amqp", "pyamqp"}
CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
# What a client sends once the handshake is done, so that a server refusing its certificate (TLS
# 1.3 says so only after the handshake) answers with an alert at once: Redis answers PING, RabbitMQ
# waits for the client's protocol header and would close the connection with a warning in its log,
# so after an amqps:// handshake the check only waits AMQPS_ALERT_WAIT_SECONDS for an alert.
REDIS_PING = b"PING\r\n"
AMQPS_ALERT_WAIT_SECONDS = 0.5


@dataclass(frozen=True)
class TlsFiles:
    """The files named by TLS_CA_FILE, TLS_CERT_FILE and TLS_KEY_FILE ("" when unset)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    names: tuple[str, str, str] = ("TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE")

    def __bool__(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)

    def check(self) -> None:
        """ValueError unless each file named is there and holds what it should."""
        ca_name, cert_name, key_name = self.names
        if bool(self.cert_file) != bool(self.key_file):
            given, missing = (cert_name, key_name) if self.cert_file else (key_name, cert_name)
            raise ValueError(f"{given} is set without {missing}: a client certificate needs both, or neither.")
        for name, path in zip(self.names, (self.ca_file, self.cert_file, self.key_file), strict=True):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{name}={path}: no such file, or not readable by this process.")
        context = ssl.create_default_context()
        if self.ca_file:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (ssl.SSLError, ValueError) as exc:
                raise ValueError(f"{ca_name}={self.ca_file} holds no PEM certificate ({exc}).") from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as exc:
                raise ValueError(
                    f"{cert_name}={self.cert_file} and {key_name}={self.key_file} are not a PEM certificate and "
                    f"its private key ({exc})."
                ) from None


@dataclass(frozen=True)
class TlsClient:
    """How the clients of one URL connect to its server over TLS."""

    scheme: str
    host: str
    port: int
    verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED
    check_hostname: bool = True
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def redis_options(self) -> dict:
        """redis-py's SSLConnection arguments (kombu's broker_use_ssl, Celery's redis_backend_use_ssl)."""
        options = {"ssl_cert_reqs": self.verify_mode}
        if self.verify_mode != ssl.CERT_NONE:
            options["ssl_check_hostname"] = self.check_hostname
        files = {"ssl_ca_certs": self.ca_file, "ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file}
        return options | {key: path for key, path in files.items() if path}

    def amqp_options(self) -> dict:
        """py-amqp's ssl arguments (kombu's broker_use_ssl for an amqps:// URL)."""
        options = {"cert_reqs": self.verify_mode}
        if self.verify_mode != ssl.CERT_NONE:
            # None: kombu puts the URL's host here, and only then does py-amqp check the name.
            options["server_hostname"] = None
        files = {"ca_certs": self.ca_file, "certfile": self.cert_file, "keyfile": self.key_file}
        return options | {key: path for key, path in files.items() if path}

    def options(self) -> dict:
        return self.amqp_options() if self.scheme == "amqps" else self.redis_options()

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file or None)
        context.check_hostname = self.check_hostname and self.verify_mode != ssl.CERT_NONE
        context.verify_mode = self.verify_mode
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def handshake(self, timeout: float) -> None:
        """A TLS handshake with the server, as its clients make it; raises what they would meet:
        ssl.SSLError, Refused when the server drops the connection after the handshake, or
        another OSError when it cannot be reached."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            with self.context().wrap_socket(sock, server_hostname=self.host) as tls:
                try:
                    if self.scheme == "rediss":
                        tls.sendall(REDIS_PING)
                        answered = tls.recv(1)
                    else:
                        tls.settimeout(AMQPS_ALERT_WAIT_SECONDS)
                        try:
                            answered = tls.recv(1)
                        except TimeoutError:
                            answered = b"(nothing yet: no alert)"
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
                    # The server's alert and its close raced our request: the alert is lost.
                    raise Refused(f"the server dropped the connection after the TLS handshake ({exc})") from exc
                except ssl.SSLError:
                    raise
                except OSError as exc:
                    raise Refused(f"the server dropped the connection after the TLS handshake ({exc})") from exc
                if not answered:
                    raise Refused("the server closed the connection after the TLS handshake")


class Refused(Exception):
    """A TLS server that dropped the connection once the handshake was done: it refused the client
    (most often: it wants a client certificate, and TLS 1.3 says so only after the handshake)."""


def client_for(variable: str, url: str, files: TlsFiles) -> TlsClient | None:
    """How the clients of `url` (the value of `variable`) use TLS: None for a plain URL."""
    parts = urlsplit(url)
    params = {key: value for key, value in parse_qsl(parts.query) if key.startswith("ssl_")}
    listed = ", ".join(sorted(params))
    if parts.scheme not in DEFAULT_PORTS:
        if params and parts.scheme in PLAIN_SCHEMES:
            raise ValueError(
                f"{variable} has TLS parameters ({listed}) on a plain {parts.scheme}:// URL: "
                f"use {'rediss' if parts.scheme == 'redis' else 'amqps'}://."
            )
        return None
    host, port = parts.hostname or "localhost", parts.port or DEFAULT_PORTS[parts.scheme]
    if not params:
        return TlsClient(
            parts.scheme, host, port, ca_file=files.ca_file, cert_file=files.cert_file, key_file=files.key_file
        )
    if parts.scheme == "amqps":
        raise ValueError(
            f"{variable}: an amqps:// URL takes no ssl_* parameters ({listed}; py-amqp reads none). "
            "Set TLS_CA_FILE, and TLS_CERT_FILE with TLS_KEY_FILE for a client certificate."
        )
    if files:
        raise ValueError(
            f"{variable} has TLS parameters ({listed}) and TLS_CA_FILE, TLS_CERT_FILE or TLS_KEY_FILE is set: "
            "give them in one place (TLS_* serves every URL; the certificate is always checked)."
        )
    reqs = params.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in CERT_REQS:
        raise ValueError(f"{variable}: ssl_cert_reqs must be required, optional or none, not {reqs!r}.")
    url_files = TlsFiles(
        params.get("ssl_ca_certs", ""),
        params.get("ssl_certfile", ""),
        params.get("ssl_keyfile", ""),
        names=tuple(f"{variable}'s {key}" for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")),
    )
    url_files.check()
    return TlsClient(
        parts.scheme,
        host,
        port,
        verify_mode=CERT_REQS[reqs],
        check_hostname=params.get("ssl_check_hostname", "true").lower() != "false",
        ca_file=url_files.ca_file,
        cert_file=url_files.cert_file,
        key_file=url_files.key_file,
    )


def clients_for(urls: dict[str, str], files: TlsFiles) -> dict[str, TlsClient]:
    """The TLS client of each TLS URL, by variable; ValueError for half a setting: TLS files that
    no URL uses, or one server reached both with TLS and without."""
    files.check()
    clients = {variable: client_for(variable, url, files) for variable, url in urls.items()}
    tls = {variable: client for variable, client in clients.items() if client is not None}
    if files and not tls:
        raise ValueError(
            f"TLS_CA_FILE, TLS_CERT_FILE or TLS_KEY_FILE is set, but {', '.join(urls)} use no TLS: "
            "use rediss:// or amqps:// URLs."
        )
    tls_addresses = {client.address: variable for variable, client in tls.items()}
    for variable, url in urls.items():
        parts = urlsplit(url)
        if clients[variable] is None and parts.scheme in PLAIN_SCHEMES and parts.hostname:
            address = f"{parts.hostname}:{parts.port or (6379 if parts.scheme == 'redis' else 5672)}"
            if address in tls_addresses:
                raise ValueError(
                    f"{variable} reaches {address} without TLS, {tls_addresses[address]} with it: "
                    f"use {'rediss' if parts.scheme == 'redis' else 'amqps'}:// in {variable} too."
                )
    return tls


def check_servers(clients: dict[str, TlsClient], *, timeout: float = 3.0) -> None:
    """Ends the process (SystemExit, with the reason) when a TLS server's certificate is not
    trusted or the handshake fails otherwise: retrying could never succeed. A server that cannot
    be reached now is left to the role's own connection retries."""
    checked = set()
    for variable, client in clients.items():
        if client.address in checked:
            continue
        checked.add(client.address)
        try:
            client.handshake(timeout)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            continue  # closed mid-handshake: a restarting server as much as a refusal
        except (ssl.SSLError, Refused) as exc:
            raise SystemExit(f"TLS to {client.address} ({variable}) failed: {exc}. {_trust_hint(client)}") from None
        except OSError:
            continue


def _trust_hint(client: TlsClient) -> str:
    trusted = f"the CA bundle {client.ca_file}" if client.ca_file else "the system's CA store (no TLS_CA_FILE)"
    certificate = f"client certificate {client.cert_file}" if client.cert_file else "no client certificate"
    return f"Checked against {trusted}, with {certificate}."
