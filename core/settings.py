"""The one settings object, read from ``FLASHSALE_*`` environment variables at the entry point."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Immutable service configuration; build it once with ``Settings()`` and pass it down."""

    model_config = SettingsConfigDict(env_prefix="FLASHSALE_", frozen=True, extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis URL; unset means start an embedded server."
    )
    database_url: str | None = Field(
        default=None, description="PostgreSQL URL; unset means start an embedded server."
    )
    admin_token: str = Field(default="change-me-admin", min_length=8)
    jwt_secret: str = Field(default="change-me-jwt-secret-at-least-32-bytes", min_length=16)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    partitions: int = Field(default=16, ge=1, le=1024)
    max_body_bytes: int = Field(default=16 * 1024, ge=256)
    redis_pool_size: int = Field(default=200, ge=1)
    pg_pool_size: int = Field(default=4, ge=1)
    max_inflight: int = Field(default=2000, ge=1, description="Reservations in flight before 429.")
    sold_out_hint_ms: int = Field(
        default=200, ge=0, description="Answer sold_out from memory this long after Redis did."
    )
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    consumer_batch: int = Field(default=500, ge=1, le=10_000)
    consumer_block_ms: int = Field(default=1000, ge=1)
    claim_idle_ms: int = Field(default=5_000, ge=0)
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
        default=0, ge=0, description="Replicas that must acknowledge a reservation before 202."
    )
    wait_timeout_ms: int = Field(
        default=1000, ge=1, description="How long a reservation waits for those replicas."
    )
    expiry_interval_ms: int = Field(default=250, ge=10, description="Expiry sweep period.")
    expiry_batch: int = Field(default=200, ge=1, le=10_000)
    log_level: str = "info"
    log_json: bool = False
    consumer_name: str | None = Field(
        default=None,
        min_length=1,
        description="This consumer's stable name in its group (unique per running process);"
        " unset: host-pid. A process restarted under its name resumes its pending entries.",
    )
