"""A private RabbitMQ node with a TLS listener that requires client certificates, and its PKI.

Why a second node: the shared broker on 5672 is the machine's, and its TLS settings are not the
tests' to change. This one is started from the same package, as its own node
(``fwtls-<random>@localhost``), with its own ports, data, logs, config and Erlang cookie, all in
a temporary folder; it listens on loopback only, has no management plugin (only
rabbitmq_auth_mechanism_ssl, for logins by client certificate), and stops with
`TlsRabbit.stop()` (or when pytest dies: PR_SET_PDEATHSIG). Its certificates come from a CA
made here with the openssl CLI, plus a second, untrusted CA for the failure cases.

Starting a node takes 10-20 s on a small machine, so the conftest fixture starts one per session.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from services.process import die_with_parent, free_loopback_port, tcp_port_open, which

START_TIMEOUT = 90.0  # seconds for the node to accept TLS connections
STOP_TIMEOUT = 30.0
USER = "fwtls"
# The package's own scripts, not Debian's /usr/sbin wrappers (those `su rabbitmq`, which resets
# HOME, and so the cookie, and cannot read a pytest temp folder).
_PACKAGE_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_script(name: str) -> str | None:
    """The path of a RabbitMQ script (rabbitmq-server, rabbitmqctl), or None if not installed."""
    packaged = _PACKAGE_SCRIPTS / name
    if packaged.is_file() and os.access(packaged, os.X_OK):
        return str(packaged)
    return which(name)


# --------------------------------------------------------------------------- the PKI


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _make_ca(folder: Path, name: str, subject: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "3",
        "-subj",
        subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )
    return cert, key


def _make_leaf(
    folder: Path, name: str, subject: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        subject,
        cwd=folder,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "3",
        "-extfile",
        str(ext),
        cwd=folder,
    )
    return cert, key


@dataclass(frozen=True)
class Pki:
    """A private CA with a server and a client certificate, and an untrusted CA with a client
    certificate of its own. Keys are unencrypted PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # signed nothing the node trusts, and trusts nothing the node presents
    rogue_client_cert: Path
    rogue_client_key: Path


def make_pki(folder: Path) -> Pki:
    """Makes the certificates with the openssl CLI (EC P-256: quick to make and to use)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "ca", "/O=fastworker tests/CN=fastworker test CA")
    rogue = _make_ca(folder, "rogue-ca", "/O=somebody else/CN=untrusted CA")
    server = _make_leaf(
        folder,
        "server",
        "/O=fastworker tests/CN=localhost",
        ca,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    client_ext = (
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n"
    )
    client = _make_leaf(folder, "client", f"/O=fastworker tests/CN={USER}", ca, client_ext)
    rogue_client = _make_leaf(folder, "rogue-client", "/CN=intruder", rogue, client_ext)
    return Pki(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        rogue_ca=rogue[0],
        rogue_client_cert=rogue_client[0],
        rogue_client_key=rogue_client[1],
    )


# --------------------------------------------------------------------------- the node


@dataclass
class TlsRabbit:
    """A running private node: `plain_url` (for the test's own helpers) and `tls_url(...)`."""

    node: str
    amqp_port: int
    tls_port: int
    password: str
    pki: Pki
    base: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    rabbitmqctl_path: str
    user: str = USER
    stopped: bool = field(default=False)

    @property
    def plain_url(self) -> str:
        """amqp:// on the node's plain loopback listener: publishing and inspecting queues."""
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.amqp_port}/"

    def tls_url(self, host: str = "localhost", client_cert: bool = True, **query: str) -> str:
        """amqps:// on the TLS listener, with the CA and (unless told not to) the client
        certificate in the query, as RabbitMQ's URI spec names them; more `query` appended."""
        params = {"cacertfile": str(self.pki.ca)}
        if client_cert:
            params |= {"certfile": str(self.pki.client_cert), "keyfile": str(self.pki.client_key)}
        params |= query
        return f"amqps://{self.user}:{self.password}@{host}:{self.tls_port}/?" + urlencode(
            params, safe="/"
        )

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n NODE ARGS` with the node's cookie; its stdout (raises on failure)."""
        result = subprocess.run(
            [self.rabbitmqctl_path, "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr or result.stdout}")
        return result.stdout

    def log(self) -> str:
        """The node's own log (startup trouble, TLS handshake errors)."""
        return "\n".join(
            path.read_text(errors="replace") for path in sorted((self.base / "log").glob("*.log"))
        )

    def stop(self) -> None:
        """SIGTERM (RabbitMQ stops itself cleanly on it); killed if it takes too long."""
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _config(base: Path, pki: Pki, amqp_port: int, tls_port: int, password: str) -> str:
    return "\n".join(
        [
            f"listeners.tcp.default = 127.0.0.1:{amqp_port}",
            f"listeners.ssl.default = 127.0.0.1:{tls_port}",
            f"ssl_options.cacertfile = {pki.ca}",
            f"ssl_options.certfile = {pki.server_cert}",
            f"ssl_options.keyfile = {pki.server_key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            # auth_mechanism=external: the client certificate's CN (USER) is the login.
            "auth_mechanisms.1 = PLAIN",
            "auth_mechanisms.2 = EXTERNAL",
            "ssl_cert_login_from = common_name",
            f"default_user = {USER}",
            f"default_pass = {password}",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            "log.console = false",
            "log.file.level = info",
            f"log.file = {base / 'log' / 'node.log'}",
            "",
        ]
    )


def start_tls_rabbitmq(base: Path) -> TlsRabbit:
    """Makes the PKI and starts the node; returns once it accepts AMQP on both listeners.

    Raises FileNotFoundError if rabbitmq-server or openssl is not installed (the fixture turns
    that into a skip), RuntimeError if the node does not come up.
    """
    server = rabbitmq_script("rabbitmq-server")
    rabbitmqctl = rabbitmq_script("rabbitmqctl")
    if server is None or rabbitmqctl is None or shutil.which("openssl") is None:
        raise FileNotFoundError("rabbitmq-server, rabbitmqctl or openssl is not installed")
    base.mkdir(parents=True, exist_ok=True)
    pki = make_pki(base / "pki")
    node = f"fwtls-{secrets.token_hex(4)}@localhost"
    amqp_port, tls_port, dist_port = (free_loopback_port() for _ in range(3))
    password = secrets.token_urlsafe(12)
    for sub in ("mnesia", "log", "home"):
        (base / sub).mkdir(exist_ok=True)
    cookie = base / "home" / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16))
    cookie.chmod(0o400)
    config = base / "rabbitmq.conf"
    config.write_text(_config(base, pki, amqp_port, tls_port, password))
    # No management plugin: only what the tests use (EXTERNAL logins).
    (base / "enabled_plugins").write_text("[rabbitmq_auth_mechanism_ssl].\n")
    (base / "rabbitmq-env.conf").write_text("")  # not the system's (its NODENAME, ...)
    env = {
        **os.environ,
        # The cookie lives in HOME: the node and rabbitmqctl read the same one.
        "HOME": str(base / "home"),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_CONFIG_FILE": str(config),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(base / "node.pid"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    with open(base / "log" / "startup.out", "wb") as out:
        proc = subprocess.Popen(
            [server],
            cwd=base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    rabbit = TlsRabbit(node, amqp_port, tls_port, password, pki, base, env, proc, rabbitmqctl)
    deadline = time.monotonic() + START_TIMEOUT
    while not (tcp_port_open("127.0.0.1", tls_port) and tcp_port_open("127.0.0.1", amqp_port)):
        if proc.poll() is not None or time.monotonic() >= deadline:
            rabbit.stop()
            startup = (base / "log" / "startup.out").read_text(errors="replace")
            raise RuntimeError(f"RabbitMQ node {node} did not start:\n{startup}\n{rabbit.log()}")
        time.sleep(0.25)
    return rabbit


__all__ = ["Pki", "TlsRabbit", "make_pki", "rabbitmq_script", "start_tls_rabbitmq"]
