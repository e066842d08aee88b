"""The transceiver's settings: environment variables ``DM_TRANSCEIVER_*`` or arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from datapath.kafka import KafkaClusterSettings

MIB = 1024 * 1024


class TransceiverSettings(BaseSettings):
    """One transceiver serves one gateway pair: the source and target cluster of a plan.

    The clusters come from the plan; ``source_kafka``/``target_kafka`` override them, e.g.
    when the gateway reaches the target through a WAN address with its own TLS and SASL
    (``DM_TRANSCEIVER_TARGET_KAFKA__BOOTSTRAP_SERVERS=...``, ``..._SASL_PASSWORD=...``).
    """

    model_config = SettingsConfigDict(
        env_prefix="DM_TRANSCEIVER_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    plan: Path = Field(description="protection plan (YAML/TOML): VMs and both clusters")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8102, ge=0, le=65535)
    source_kafka: KafkaClusterSettings | None = None
    target_kafka: KafkaClusterSettings | None = None
    vms: list[str] | None = Field(
        default=None, description="copy only these VMs (default: every VM of the plan)"
    )

    gateway_pair: str = Field(default="default", description="name of this gateway pair")
    transactional_id_prefix: str = Field(
        default="datamover-transceiver",
        description="target transactional ids are <prefix>.<vm id>: stable, one per VM",
    )
    mode: Literal["continuous", "periodic"] = "continuous"
    interval_s: float = Field(
        default=60.0, gt=0, description="periodic mode: copy everything there is this often"
    )
    bandwidth_bytes_per_s: int | None = Field(
        default=None, gt=0, description="WAN throttle for the whole pair (unset: unlimited)"
    )
    burst_bytes: int | None = Field(default=None, gt=0)

    max_transaction_messages: int = Field(default=256, ge=1)
    max_transaction_bytes: int = Field(default=16 * MIB, ge=1)
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000)
    operation_timeout_s: float = Field(
        default=45.0, gt=0, description="a step (open, copy one transaction) longer than this fails"
    )
    retry_backoff_s: float = Field(default=0.5, gt=0)
    max_retry_backoff_s: float = Field(default=15.0, gt=0)
    lag_refresh_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> TransceiverSettings:
        if self.burst_bytes is not None and self.bandwidth_bytes_per_s is None:
            raise ValueError("burst_bytes needs bandwidth_bytes_per_s")
        return self
