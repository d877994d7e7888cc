"""The one settings object, read from ``FLASHSALE_*`` environment variables at the entry point."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ADMIN_TOKEN = "change-me-admin"
DEFAULT_JWT_SECRET = "change-me-jwt-secret-at-least-32-bytes"
# A blocking command (XREADGROUP BLOCK, WAIT) must come back this long before the socket
# timeout, or the client gives up on a healthy connection and drops the reply.
SOCKET_HEADROOM_MS = 1000


class Settings(BaseSettings):
    """Immutable service configuration; build it once with ``Settings()`` and pass it down."""

    model_config = SettingsConfigDict(env_prefix="FLASHSALE_", frozen=True, extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis URL; unset means start an embedded server."
    )
    database_url: str | None = Field(
        default=None, description="PostgreSQL URL; unset means start an embedded server."
    )
    admin_token: str = Field(
        default=DEFAULT_ADMIN_TOKEN,
        min_length=8,
        description="Bearer token of admin routes; the public default only for `up` and `demo`.",
    )
    jwt_secret: str = Field(
        default=DEFAULT_JWT_SECRET,
        min_length=16,
        description="HS256 secret of buyer JWTs; the public default only for `up` and `demo`.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int | None = Field(
        default=None,
        ge=1,
        description="API processes of `serve` and `up` on one port; unset: the CPUs this process"
        " may run on. 1: the API in the command's own process.",
    )
    partitions: int = Field(default=16, ge=1, le=1024)
    max_body_bytes: int = Field(default=16 * 1024, ge=256)
    redis_cluster: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Whether FLASHSALE_REDIS_URL names a Redis Cluster node. auto: ask the node"
        " (INFO cluster) when the first client is built.",
    )
    redis_pool_size: int = Field(
        default=200,
        ge=1,
        description="Redis connections per process (on a cluster: per node); a request waits"
        " for a free one.",
    )
    redis_socket_timeout_ms: int = Field(
        default=10_000,
        ge=100,
        description="How long a Redis command may wait for its reply before the client gives up.",
    )
    pg_pool_size: int = Field(default=4, ge=1)
    max_inflight: int = Field(default=2000, ge=1, description="Reservations in flight before 429.")
    sold_out_hint_ms: int = Field(
        default=200, ge=0, description="Answer sold_out from memory this long after Redis did."
    )
    sale_view_cache_ms: int = Field(
        default=5,
        ge=0,
        description="GET /v1/sales/{id} answers at most this old (per API process); 0: off.",
    )
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    consumer_workers: int | None = Field(
        default=None,
        ge=1,
        description="Projector processes of `consume`, sharing the partitions through leases;"
        " unset: the CPUs this process may run on. 1: in the command's own process.",
    )
    consumer_batch: int = Field(default=500, ge=1, le=10_000)
    consumer_block_ms: int = Field(default=1000, ge=1)
    claim_idle_ms: int = Field(default=5_000, ge=0)
    consumer_lease_ms: int = Field(
        default=5_000,
        ge=0,
        description="How long a projector's lease on a partition lasts unless renewed (a dead"
        " consumer's partitions wait this long for another); 0: no leases, every consumer"
        " reads every partition.",
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        description="An entry is tried at most this many times before it is dead-lettered.",
    )
    retention_interval_ms: int = Field(
        default=30_000, ge=0, description="How often the consumer daemon trims streams; 0: never."
    )
    durability: Literal["none", "strict"] = Field(
        default="none",
        description="strict: refuse to start unless Redis fsyncs every write (AOF, always).",
    )
    wait_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas that must acknowledge a placement, payment, cancellation or"
        " an admin's write to a sale before its 202, 201 or 200, and hold a log entry before"
        " the projector writes it to PostgreSQL.",
    )
    wait_timeout_ms: int = Field(
        default=1000, ge=1, description="How long such a write waits for those replicas."
    )
    expiry_interval_ms: int = Field(default=250, ge=10, description="Expiry sweep period.")
    expiry_batch: int = Field(default=200, ge=1, le=10_000)
    metrics_health_interval_ms: int = Field(
        default=5000,
        ge=0,
        description="/metrics reads consumer health from Redis at most this often.",
    )
    log_level: str = "info"
    log_json: bool = False
    prune_interval_ms: int = Field(
        default=30_000,
        ge=0,
        description="How often the consumer daemon prunes final reservations from Redis; 0: never.",
    )
    prune_after_seconds: int = Field(
        default=300,
        ge=0,
        description="Keep a final reservation in Redis this long after its final event.",
    )
    prune_batch: int = Field(
        default=100, ge=1, le=1000, description="Reservations removed per Lua script call."
    )
    consumer_name: str | None = Field(
        default=None,
        min_length=1,
        description="This consumer's stable name in its group (unique per running process);"
        " unset: host-pid. A process restarted under its name resumes its pending entries.",
    )

    @model_validator(mode="after")
    def _blocking_commands_fit_the_socket_timeout(self) -> Self:
        """Refuse a block or wait time the Redis socket timeout would cut short."""
        limit = self.redis_socket_timeout_ms - SOCKET_HEADROOM_MS
        for name, value in (
            ("consumer_block_ms", self.consumer_block_ms),
            ("wait_timeout_ms", self.wait_timeout_ms),
        ):
            if value > limit:
                raise ValueError(
                    f"FLASHSALE_{name.upper()}={value} must be at most "
                    f"FLASHSALE_REDIS_SOCKET_TIMEOUT_MS - {SOCKET_HEADROOM_MS} = {limit}: "
                    "raise the socket timeout or lower the block/wait time"
                )
        return self

    def default_secrets(self) -> list[str]:
        """The environment variables of secrets still at their public built-in values."""
        return [
            f"FLASHSALE_{name.upper()}"
            for name, default in (
                ("admin_token", DEFAULT_ADMIN_TOKEN),
                ("jwt_secret", DEFAULT_JWT_SECRET),
            )
            if getattr(self, name) == default
        ]
