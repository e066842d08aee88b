"""The receiver's settings: environment variables ``DM_RECEIVER_*`` or arguments."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class ReceiverSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DM_RECEIVER_", extra="forbid", frozen=True)

    plan: Path = Field(description="protection plan (YAML/TOML): VMs and the source cluster")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8101, ge=0, le=65535)

    group_id: str = Field(
        default="datamover-receiver",
        description="consumer group shared by every receiver of the source site",
    )
    instance_id: str | None = Field(
        default=None,
        description=(
            "static group membership id, unique per receiver (e.g. the pod name): a "
            "restarted receiver takes its VMs back at once instead of after a rebalance"
        ),
    )
    transactional_id_prefix: str = Field(
        default="datamover-receiver",
        description="transactional ids are <prefix>.<vm id>: one per VM, stable everywhere",
    )

    batch_interval_s: float = Field(
        default=0.1,
        gt=0,
        description="cut a batch this often (shorter: lower RPO, less folding, more transactions)",
    )
    # A tap publishes a frame every few ms (its linger); fetched one by one, they cost the
    # source broker and the receiver a request each. Measured at 20 MB/s of 64 KiB writes
    # (bench/e2e.py --rpo-only --quick, alternating): 1 MiB or 20 ms took the receiver
    # 25 % and the source broker 11 % less CPU than 1 byte or 100 ms, RPO unchanged.
    fetch_min_bytes: int = Field(
        default=MIB,
        ge=1,
        description="a fetch from the tap topics returns once this much data is there",
    )
    fetch_max_wait_ms: int = Field(
        default=20,
        ge=0,
        description="or once it waited this long (adds at most this to the RPO)",
    )
    # Bounded so that a batch's records (data plus a 52-byte header each) stay below the
    # journal format's limit on a batch (datapath.journal.MAX_BATCH_PAYLOAD_BYTES).
    max_batch_bytes: int = Field(
        default=16 * MIB, ge=1, le=128 * MIB, description="cut a batch at this much raw guest data"
    )
    max_batch_records: int = Field(default=100_000, ge=1, le=1_000_000)
    max_record_bytes: int = Field(
        default=MIB, ge=512, description="folding merges adjacent data up to this size"
    )
    fold: bool = Field(default=True, description="fold overwrites (off only for baselines)")
    compress: bool = Field(default=True, description="zstd-compress batches")
    # 1, not zstd's default 3: on file system data (binaries, libraries, documents, in
    # 2 MiB batches) level 3 compressed at 124 MB/s on one core with a ratio of 0.329,
    # level 1 at 257 MB/s with 0.365. Level 3 would cap one VM's protected throughput
    # below the 150 MB/s goal; raise it where the WAN, not the CPU, is the limit.
    compression_level: int = Field(
        default=1, ge=-7, le=22, description="zstd level (negative: faster, less compression)"
    )

    session_timeout_ms: int = Field(default=10_000, ge=6_000)
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000)
    kafka_retry_backoff_s: float = Field(
        default=0.5,
        gt=0,
        description=(
            "after a Kafka error, the loop waits this long; a VM that could not be opened "
            "is tried again after it, doubling up to 30 s"
        ),
    )
    lag_refresh_s: float = Field(default=2.0, gt=0)
