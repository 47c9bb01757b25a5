"""The one place a Redis client is opened: one server, a Sentinel-watched master, or a Cluster (issue 24).

Every client the sidecar holds comes from `open_client`, with the same rules whatever the topology:
no client-side retries of a failed command (a dead Redis must cost a request microseconds, not
seconds of backoff; the next command reconnects by itself), short connect and read timeouts, and
a bounded pool. What differs:

- Sentinel: redis-py's `Sentinel` asks the sentinels for the master's address on every new
  connection, so after a failover the first commands fail (the store fails open, followers retry
  from their last id) and the next connection goes to the promoted replica. A connection that
  finds itself on a demoted master (READONLY) is dropped the same way.
- Cluster: `RedisCluster` routes each command by its key's slot and follows MOVED/ASK itself, so
  a slot migration (`redis-cli --cluster reshard`) costs a redirect, not an error. Its pool bound
  is per node. Every multi-key command and script keeps its keys in one slot (keys.py).
"""

from __future__ import annotations

import os
from typing import Any, Literal, TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..settings import RedisTarget

Client: TypeAlias = "Redis | RedisCluster"
# redis-py 8 caps a pool at 100 connections and fails at once past that: 200 stream starts at a
# time exceeded it, and every overflow read as "Redis unavailable".
MAX_CONNECTIONS = 1_000


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A pool that asks the sentinels where the master is, and waits for a free connection when full."""


class SentinelMaster(Redis):
    """The master's client, closing the sentinels' clients with its own pool (redis-py leaves them open)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            await sentinel.aclose()


def open_client(target: RedisTarget, *, socket_timeout: float = 1.0, connect_timeout: float = 0.5,
                max_connections: int = MAX_CONNECTIONS, pool_timeout: float | None = None,
                role: Literal["requests", "blocking", "leases"] = "requests") -> Client:
    """A client of `target`. `pool_timeout`: wait that long for a free connection when the pool is
    full (blocking reads), instead of failing at once. `role` names the connections in CLIENT LIST, with the pid."""
    kwargs: dict[str, Any] = dict(socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
                                  retry=Retry(NoBackoff(), 0), client_name=f"crm-ai-{role}-{os.getpid()}")
    if target.mode == "single":
        assert target.url is not None
        if pool_timeout is None:
            return Redis.from_url(target.url, max_connections=max_connections, **kwargs)
        pool = BlockingConnectionPool.from_url(target.url, max_connections=max_connections, timeout=pool_timeout, **kwargs)
        return Redis(connection_pool=pool)
    auth: dict[str, Any] = dict(username=target.username, password=target.password, ssl=target.tls)
    if target.mode == "sentinel":
        sentinel_kwargs = dict(socket_connect_timeout=connect_timeout, socket_timeout=max(socket_timeout, 0.5),
                               password=target.sentinel_password, ssl=target.tls)
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs)
        extra: dict[str, Any] = {"timeout": pool_timeout} if pool_timeout is not None else {}
        if pool_timeout is not None:
            return sentinel.master_for(target.master, SentinelMaster, connection_pool_class=BlockingSentinelPool, db=target.db,
                                       max_connections=max_connections, **auth, **kwargs, **extra)
        return sentinel.master_for(target.master, SentinelMaster, db=target.db, max_connections=max_connections, **auth, **kwargs)
    # Cluster: the bound is per node. Its own retry budget covers only connection errors (a
    # re-read of the slot map); MOVED and ASK are followed within the command regardless.
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
                        max_connections=max_connections, require_full_coverage=False, **auth, **kwargs)


async def describe(client: Client, target: RedisTarget) -> str:
    """What `adapter check` says it found: the server, the master a sentinel named, or the cluster's state."""
    if target.mode == "sentinel":
        assert isinstance(client, Redis)
        host, port = await client.connection_pool.get_master_address()  # type: ignore[attr-defined]
        await client.ping()
        return f"Redis master {target.master!r} at {host}:{port} (Sentinel {target.shown})"
    if target.mode == "cluster":
        assert isinstance(client, RedisCluster)
        info = await client.cluster_info(target_nodes=RedisCluster.RANDOM)
        await client.ping(target_nodes=RedisCluster.PRIMARIES)
        primaries = len(client.get_primaries())
        if info.get("cluster_state") != "ok":
            raise ConnectionError(f"cluster_state is {info.get('cluster_state')!r}, not ok")
        return f"Redis Cluster at {target.shown}: {primaries} masters, state ok"
    await client.ping()
    return f"Redis at {target.shown}"
