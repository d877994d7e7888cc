"""The durability check run at start: does Redis persist writes as the operator asked?

``FLASHSALE_DURABILITY=strict`` means a reservation answered 202 must survive Redis being
killed outright, so Redis has to append every write to its AOF and fsync it before it
answers (``appendonly yes``, ``appendfsync always``). ``none`` accepts whatever Redis does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError

from core.errors import DurabilityError, InfrastructureError
from core.gateway.clients import RedisClient
from core.settings import Settings

log = structlog.get_logger(__name__)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Persistence:
    """What Redis reports about its persistence and replication."""

    appendonly: str | None
    appendfsync: str | None
    replicas: int

    @property
    def fsyncs_every_write(self) -> bool:
        """True when every acknowledged write is on disk (AOF with ``appendfsync always``)."""
        return self.appendonly == "yes" and self.appendfsync == "always"


async def read_persistence(client: RedisClient) -> Persistence:
    """CONFIG GET appendonly / appendfsync and the connected replica count.

    A server that refuses CONFIG (some managed services rename it) reports ``None``. On a
    cluster every primary is asked, and the weakest answer stands: the first primary that
    does not fsync every write (else the first one), with the fewest replicas of any.
    """
    if not isinstance(client, RedisCluster):
        return await _read_node(client, None)
    try:
        await client.initialize()  # a client that has run no command yet knows no nodes
    except RedisError as e:
        raise InfrastructureError(f"cannot read the redis cluster's nodes: {e}") from e
    each = [await _read_node(client, node) for node in client.get_primaries()]
    if not each:
        raise InfrastructureError("the redis cluster reports no primary")
    weakest = next((p for p in each if not p.fsyncs_every_write), each[0])
    return Persistence(weakest.appendonly, weakest.appendfsync, min(p.replicas for p in each))


async def _read_node(client: RedisClient, node: ClusterNode | None) -> Persistence:
    """:func:`read_persistence` of one server, or of one ``node`` of a cluster."""
    target: dict[str, Any] = {} if node is None else {"target_nodes": node}
    try:
        replicas = int((await client.info("replication", **target)).get("connected_slaves", 0))
    except RedisError as e:
        raise InfrastructureError(f"cannot read redis replication info: {e}") from e
    try:
        config = await client.config_get("append*", **target)
    except RedisError:
        return Persistence(appendonly=None, appendfsync=None, replicas=replicas)
    values = {_text(k): _text(v) for k, v in config.items()}
    return Persistence(values.get("appendonly"), values.get("appendfsync"), replicas)


def durability_problem(settings: Settings, persistence: Persistence) -> str | None:
    """Why ``persistence`` falls short of what ``settings`` demand, or None. Pure."""
    if settings.durability != "strict" or persistence.fsyncs_every_write:
        return None
    if persistence.appendonly is None:
        found = "redis refused CONFIG GET, so its persistence cannot be checked"
    else:
        found = f"appendonly={persistence.appendonly}, appendfsync={persistence.appendfsync}"
    return (
        "FLASHSALE_DURABILITY=strict needs redis to fsync every write before answering "
        f"(appendonly=yes, appendfsync=always), but {found}. Start redis with "
        "`--appendonly yes --appendfsync always`, or set FLASHSALE_DURABILITY=none."
    )


async def check_durability(client: RedisClient, settings: Settings) -> Persistence:
    """Raise ``DurabilityError`` unless Redis persists writes as ``settings`` demand.

    Fewer connected replicas than ``wait_replicas`` is only logged: replicas may come
    later, and until they do every placement, payment and cancellation is answered 503
    ``not_replicated``.
    """
    persistence = await read_persistence(client)
    problem = durability_problem(settings, persistence)
    if problem is not None:
        raise DurabilityError(problem)
    if persistence.replicas < settings.wait_replicas:
        log.warning(
            "too_few_replicas", connected=persistence.replicas, wanted=settings.wait_replicas
        )
    log.info(
        "durability_checked",
        durability=settings.durability,
        appendonly=persistence.appendonly,
        appendfsync=persistence.appendfsync,
        replicas=persistence.replicas,
        wait_replicas=settings.wait_replicas,
    )
    return persistence
