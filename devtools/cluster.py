"""A throwaway Redis Cluster on loopback: 3 masters and 3 replicas from the installed binaries.

What a single Redis never shows needs a real cluster: MOVED redirections, CROSSSLOT refusals and
a replica promoted when its master dies. Each node has a temporary directory of its own, so a
killed node restarts with its identity (nodes.conf) and rejoins as a replica; nothing is saved
to disk, so the rejoined node resyncs from its new master.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from devtools.servers import free_port, port_open

MASTERS = 3
NODES = MASTERS * 2
START_TIMEOUT_S = 20.0
SETTLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _Seen:
    """One line of CLUSTER NODES: a node as another node sees it."""

    port: int
    flags: frozenset[str]
    serves_slots: bool
    node_id: str = ""
    # A replica's master's node id ("-" for a master).
    master_id: str = "-"

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?"})


@dataclass
class _Node:
    port: int
    bus_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _ask(port: int, *command: str) -> Any:
    """One command to one node, on a connection of its own: nodes die under these calls."""
    with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as client:
        return client.execute_command(*command)


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return list(ports)


def _cluster_nodes(port: int) -> list[_Seen]:
    # ("CLUSTER", "NODES") as two words bypasses redis-py's parser: the raw text keeps the flags.
    text = str(_ask(port, "CLUSTER", "NODES"))
    seen = []
    for line in text.splitlines():
        fields = line.split()
        address = fields[1].split("@")[0]
        slots = [f for f in fields[8:] if not f.startswith("[")]  # "[...]" is a migration
        seen.append(
            _Seen(
                int(address.rsplit(":", 1)[1]),
                frozenset(fields[2].split(",")),
                bool(slots),
                node_id=fields[0],
                master_id=fields[3],
            )
        )
    return seen


def _cluster_state_ok(port: int) -> bool:
    return "cluster_state:ok" in str(_ask(port, "CLUSTER", "INFO"))


def _linked_if_replica(port: int) -> bool:
    info = _ask(port, "INFO", "replication")
    return info["role"] == "master" or info.get("master_link_status") == "up"


def _wait(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # A node going down or rejoining refuses or drops connections for a moment: retry.
        try:
            if ready():
                return
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Redis Cluster: {what} not reached within {timeout}s")


@dataclass
class Cluster:
    ports: list[int]
    node_timeout_ms: int
    _binary: str = field(repr=False)
    _nodes: dict[int, _Node] = field(repr=False)

    @property
    def url(self) -> str:
        """A live node's URL: the client discovers the others, but only if its first one answers."""
        return f"redis://127.0.0.1:{self._live()[0]}/0"

    def masters(self) -> list[int]:
        """Ports serving slots, as a live node sees the cluster now."""
        return sorted(s.port for s in _cluster_nodes(self._live()[0]) if s.serves_slots)

    def replicas(self) -> list[int]:
        return sorted(
            s.port for s in _cluster_nodes(self._live()[0]) if "slave" in s.flags and not s.failed
        )

    def master_of(self, key: str) -> int:
        """Port of the master serving `key`'s slot, from CLUSTER KEYSLOT and CLUSTER SLOTS."""
        port = self._live()[0]
        slot = int(_ask(port, "CLUSTER", "KEYSLOT", key))
        for start, end, master, *_replicas in _ask(port, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def replica_of(self, master_port: int) -> int:
        """Port of a live replica of the master on `master_port`, as a live node sees it now."""
        seen = _cluster_nodes(self._live()[0])
        master = next(s for s in seen if s.port == master_port)
        for node in seen:
            if node.master_id == master.node_id and not node.failed:
                return node.port
        raise RuntimeError(f"{master_port} has no live replica")

    def pid_of(self, port: int) -> int:
        proc = self._nodes[port].proc
        if proc is None or not self._nodes[port].alive:
            raise RuntimeError(f"the node on {port} is not running")
        return proc.pid

    def signal(self, port: int, sig: signal.Signals) -> None:
        """Send `sig` to the node on `port` (SIGSTOP freezes it, SIGCONT wakes it up)."""
        os.kill(self.pid_of(port), sig)

    def freeze_replica(self, master_port: int) -> int:
        """Make the next writes of `master_port` unreplicated: freeze (SIGSTOP) its replica, then
        close the replication link on the master's side; returns the replica's port.

        The freeze alone loses nothing: what the master sends still lands in the frozen
        process' socket buffer, which it reads on waking (even after the master died). With the
        link closed, writes the master acknowledges from now on reach no replica at all, so a
        failover before the replica is thawed (`signal(port, SIGCONT)`) loses them. Keep the
        freeze short: a replica whose link was down longer than `cluster-replica-validity-factor`
        (10) node timeouts refuses to be promoted."""
        replica = self.replica_of(master_port)
        self.signal(replica, signal.SIGSTOP)
        _ask(master_port, "CLIENT", "KILL", "TYPE", "replica")
        return replica

    def kill(self, port: int) -> None:
        """SIGKILL: no goodbye to the other nodes, which must detect the death themselves."""
        node = self._nodes[port]
        if node.proc is not None and node.alive:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)

    def restart(self, port: int) -> None:
        """Start a killed node again; returns once it rejoined (as a replica, if it failed over)."""
        self._start(self._nodes[port])
        _wait("the restarted node rejoining", self._settled, SETTLE_TIMEOUT_S)

    def wait_failover(self, old_master_port: int, timeout: float = 30) -> None:
        """Until a replica of the killed master serves its slots and every live node is ok."""
        if self._nodes[old_master_port].alive:
            raise ValueError(f"{old_master_port} is alive: kill it first")
        _wait(f"failover of {old_master_port}", self._settled, timeout)

    def flushall(self) -> None:
        for port in self.masters():
            _ask(port, "FLUSHALL")

    def _live(self) -> list[int]:
        live = [port for port in self.ports if self._nodes[port].alive]
        if not live:
            raise RuntimeError("every node of the cluster is down")
        return live

    def _start(self, node: _Node) -> None:
        node.proc = subprocess.Popen(self._command(node), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open("127.0.0.1", node.port):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {node.directory}/redis.log")
            time.sleep(0.02)

    def _command(self, node: _Node) -> list[str]:
        return [
            self._binary,
            "--port",
            str(node.port),
            # The default bus port, port + 10000, was never checked free (and may fall in the
            # range outgoing connections draw from): the bus gets a free port of its own.
            "--cluster-port",
            str(node.bus_port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--save",
            "",
            "--appendonly",
            "no",
            # The default waits 5 s for more replicas before a full sync: every start would too.
            "--repl-diskless-sync-delay",
            "0",
            "--dir",
            str(node.directory),
            "--logfile",
            str(node.directory / "redis.log"),
        ]

    def _settled(self) -> bool:
        """Every live node says ok and sees: the slots served by live masters only, every other
        live node as their replica (a new one is a master without slots for a moment), no live
        node failed. Every live replica is linked to its master."""
        live = set(self._live())
        for port in live:
            seen = [s for s in _cluster_nodes(port) if s.port in live or s.serves_slots]
            serving = {s.port for s in seen if s.serves_slots}
            if len(serving) != MASTERS or not serving <= live:
                return False
            others = [s for s in seen if s.port not in serving]
            if any(s.failed for s in seen) or not all("slave" in s.flags for s in others):
                return False
            if not _cluster_state_ok(port):
                return False
        return all(_linked_if_replica(port) for port in live)

    def _create(self) -> None:
        redis_cli = shutil.which("redis-cli")
        if not redis_cli:
            raise RuntimeError("redis-cli is not installed (it comes with redis-server)")
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        options = ["--cluster-replicas", "1", "--cluster-yes"]
        created = subprocess.run(
            [redis_cli, "--cluster", "create", *addresses, *options],
            capture_output=True,
            text=True,
            timeout=SETTLE_TIMEOUT_S,
            check=False,
        )
        if created.returncode != 0:  # redis-cli tells why on stdout
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        # redis-cli returns once the slots are assigned; the replicas attach a moment later.
        _wait("cluster_state:ok with every replica linked", self._settled, SETTLE_TIMEOUT_S)

    def _stop(self) -> None:
        for node in self._nodes.values():
            if node.proc is not None and node.alive:
                node.proc.terminate()
        for node in self._nodes.values():
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(10)


@contextmanager
def redis_cluster(node_timeout_ms: int = 2000) -> Iterator[Cluster]:
    """A formed cluster, every replica linked; `node_timeout_ms` bounds how long a dead master
    goes unnoticed, so failover takes about twice that."""
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("redis-server is not installed: the cluster harness starts its own")
    with tempfile.TemporaryDirectory(prefix="bb-cluster-") as root:
        ports = _free_ports(NODES * 2)
        nodes = {}
        for index, (port, bus_port) in enumerate(zip(ports[::2], ports[1::2], strict=True)):
            directory = Path(root) / f"node{index}"
            directory.mkdir()
            nodes[port] = _Node(port, bus_port, directory)
        cluster = Cluster(list(nodes), node_timeout_ms, binary, nodes)
        try:
            for node in nodes.values():
                cluster._start(node)
            cluster._create()
            yield cluster
        finally:
            cluster._stop()
