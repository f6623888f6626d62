"""A private three-node RabbitMQ cluster on loopback, started from Debian's rabbitmq-server.

Why: failover can only be tested against a real cluster, and the machine's broker on 5672 is not
the tests' to stop. The nodes are started the way `rabbitmq_tls` starts its private node (the
package's own scripts, every path in a temporary folder, PR_SET_PDEATHSIG): distinct names
(``fwc1-<token>@localhost`` ...), distinct AMQP and distribution ports, one Erlang cookie, no
plugins at all (`RABBITMQ_ENABLED_PLUGINS_FILE` holds ``[].``), loopback only. They start in
parallel; then the second and third join the first (``stop_app; join_cluster; start_app``, also
in parallel). Every wait is bounded. `RabbitCluster.stop()` stops all nodes (the session-scoped
fixture calls it at the end).

Erlang's schedulers spin while idle by default; on a small shared machine three idle nodes
would then eat a core, so they are told not to (``+sbwt none``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.process import die_with_parent, free_loopback_port, tcp_port_open
from services.rabbitmq import amqp_declare, rabbitmq_ready
from services.rabbitmq_tls import rabbitmq_script

START_TIMEOUT = 120.0  # seconds for all nodes to accept AMQP (they start at once, on 2 cores)
JOIN_TIMEOUT = 120.0  # seconds for each rabbitmqctl step of a join
STOP_TIMEOUT = 30.0
SIZE = 3
_ERL_ARGS = (
    "-kernel inet_dist_use_interface {127,0,0,1} "
    "+sbwt none +sbwtdcpu none +sbwtdio none"  # no busy-waiting schedulers
)


@dataclass
class ClusterNode:
    """One node: its name, ports, folder and environment (the cookie is shared)."""

    name: str
    amqp_port: int
    dist_port: int
    base: Path
    env: dict[str, str]
    rabbitmqctl_path: str
    server_path: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """amqp:// on its loopback listener, as guest (allowed on loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def where(self) -> str:
        return f"127.0.0.1:{self.amqp_port}"

    def start(self) -> None:
        """Starts the node's Erlang VM and RabbitMQ in the foreground, output to its log."""
        with open(self.base / "log" / "startup.out", "ab") as out:
            self.proc = subprocess.Popen(
                [self.server_path],
                cwd=self.base,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

    def rabbitmqctl(self, *args: str, timeout: float = JOIN_TIMEOUT) -> str:
        """`rabbitmqctl -n NODE ARGS` with the cluster's cookie; stdout (raises on failure)."""
        result = subprocess.run(
            [self.rabbitmqctl_path, "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {self.name} {' '.join(args)}: {result.stderr or result.stdout}"
            )
        return result.stdout

    def stop_app(self) -> None:
        """Stops RabbitMQ on the node (its clients are disconnected, its queue replicas go
        down), leaving the Erlang VM running so that `start_app` brings it back quickly."""
        self.rabbitmqctl("stop_app")

    def start_app(self, timeout: float = START_TIMEOUT) -> None:
        """Starts RabbitMQ again after `stop_app`; returns once it takes AMQP connections."""
        self.rabbitmqctl("start_app", timeout=timeout)
        self.wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL to the node's Erlang VM (its pid file names it): a crash, with no goodbye to
        clients or to the other nodes. `restart` brings it back as a member."""
        pid = int((self.base / "node.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(STOP_TIMEOUT)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Starts a killed node again (it rejoins its cluster); returns once it takes AMQP."""
        self.start()
        self.wait_ready(timeout)

    def accepts_amqp(self) -> bool:
        return tcp_port_open("127.0.0.1", self.amqp_port) and rabbitmq_ready(self.url)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.accepts_amqp():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {self.name} exited:\n{self.log()}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"RabbitMQ node {self.name} not ready in {timeout:.0f} s")
            time.sleep(0.25)

    def log(self) -> str:
        """The node's startup output and its own log, for failure messages."""
        return "\n".join(
            path.read_text(errors="replace")[-20_000:]
            for path in sorted((self.base / "log").glob("*"))
            if path.is_file()
        )

    def stop(self) -> None:
        """SIGTERM (RabbitMQ stops itself cleanly on it); killed if it takes too long."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class RabbitCluster:
    """The running nodes; `urls` in node order (the first node is the one the others joined)."""

    nodes: list[ClusterNode]
    stopped: bool = field(default=False)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node_at(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.amqp_port == port)

    def running_nodes(self) -> list[str]:
        """The running members as the first running node sees them (cluster_status)."""
        for node in self.nodes:
            if node.accepts_amqp():
                out = node.rabbitmqctl("cluster_status", "--formatter", "json", timeout=60)
                return sorted(json.loads(out).get("running_nodes", []))
        return []

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for node in self.nodes:  # SIGTERM all first: they stop in parallel
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()


def _node(base: Path, index: int, token: str, cookie_home: Path) -> ClusterNode:
    server = rabbitmq_script("rabbitmq-server")
    rabbitmqctl = rabbitmq_script("rabbitmqctl")
    if server is None or rabbitmqctl is None:
        raise FileNotFoundError("rabbitmq-server or rabbitmqctl is not installed")
    folder = base / f"node{index}"
    for sub in ("mnesia", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    name = f"fwc{index}-{token}@localhost"
    amqp_port, dist_port = free_loopback_port(), free_loopback_port()
    config = folder / "rabbitmq.conf"
    config.write_text(
        "\n".join(
            [
                f"listeners.tcp.default = 127.0.0.1:{amqp_port}",
                "loopback_users.guest = true",
                "log.console = false",
                "log.file.level = info",
                f"log.file = {folder / 'log' / 'node.log'}",
                "",
            ]
        )
    )
    (folder / "enabled_plugins").write_text("[].\n")  # no management plugin, no plugin at all
    (folder / "rabbitmq-env.conf").write_text("")  # not the system's (its NODENAME, ...)
    env = {
        **os.environ,
        "HOME": str(cookie_home),  # the cookie lives there: the same for every node
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
        "RABBITMQ_LOG_BASE": str(folder / "log"),
        "RABBITMQ_CONFIG_FILE": str(config),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(folder / "node.pid"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": _ERL_ARGS,
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    return ClusterNode(name, amqp_port, dist_port, folder, env, rabbitmqctl, server)


def _join(node: ClusterNode, first: ClusterNode) -> None:
    """`stop_app; join_cluster; start_app`; once more from a clean slate if that failed (the
    node forgotten by the cluster, its own state force-reset: after a failed schema merge a
    plain `reset` cannot even start Mnesia)."""
    try:
        node.rabbitmqctl("stop_app")
        node.rabbitmqctl("join_cluster", first.name)
        node.rabbitmqctl("start_app")
    except (RuntimeError, subprocess.TimeoutExpired):
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            node.rabbitmqctl("stop_app")
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            first.rabbitmqctl("forget_cluster_node", node.name)
        node.rabbitmqctl("force_reset")
        node.rabbitmqctl("join_cluster", first.name)
        node.rabbitmqctl("start_app")
    node.wait_ready(JOIN_TIMEOUT)


def start_rabbitmq_cluster(base: Path, size: int = SIZE) -> RabbitCluster:
    """Starts `size` nodes in parallel and joins them into one cluster; returns once every node
    takes AMQP connections as a member. Raises FileNotFoundError if RabbitMQ is not installed,
    RuntimeError (with the nodes' logs) if the cluster does not come up; no node is left
    running then."""
    base.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(3)
    home = base / "home"
    home.mkdir(exist_ok=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16))
    cookie.chmod(0o400)
    cluster = RabbitCluster([_node(base, i + 1, token, home) for i in range(size)])
    try:
        for node in cluster.nodes:
            node.start()
        for node in cluster.nodes:
            node.wait_ready(START_TIMEOUT)
        first, *others = cluster.nodes
        # One at a time: two nodes merging their schema with the cluster at once failed one of
        # them in CI (Mnesia's "Failed to merge schema: combine_error"), and then its reset too.
        for node in others:
            _join(node, first)
        members = cluster.running_nodes()
        if members != sorted(node.name for node in cluster.nodes):
            raise RuntimeError(f"the cluster runs {members}, not all {size} nodes")
    except BaseException as exc:
        logs = "\n".join(f"--- {node.name} ---\n{node.log()}" for node in cluster.nodes)
        cluster.stop()
        if isinstance(exc, RuntimeError | subprocess.TimeoutExpired):
            raise RuntimeError(f"{exc}\n{logs}") from exc
        raise
    return cluster


def declare_quorum_queue(url: str, queue: str) -> None:
    """Declares `queue` as a durable quorum queue through the node at `url` (its replicas go
    on every node of the cluster; the leader on that node)."""
    amqp_declare(url, queue, durable=True, arguments={"x-queue-type": "quorum"})


__all__ = ["ClusterNode", "RabbitCluster", "declare_quorum_queue", "start_rabbitmq_cluster"]
