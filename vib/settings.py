"""The tap's settings: environment variables with the prefix DM_TAP_ (or arguments)."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vib.activity_log import MAX_SLOTS as ACTIVITY_LOG_MAX_SLOTS


class OutagePolicy(StrEnum):
    """What the tap does when Kafka is unreachable or its buffer is full."""

    # Keep serving the guest at full speed; record dirty regions in the persistent
    # bitmap and resync them when Kafka is back.
    TRACK = "track"
    # Make guest writes wait for buffer space (the guest slows down to Kafka's pace;
    # if Kafka is down for longer than outage_timeout_s the tap tracks anyway).
    BACKPRESSURE = "backpressure"


def _power_of_two(value: int, name: str) -> None:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")


class TapSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DM_TAP_", extra="ignore")

    plan: Path = Field(description="protection plan file (YAML or TOML)")
    state_dir: Path = Field(
        default=Path("/var/lib/datamover/tap"),
        description="activity logs, dirty bitmaps and epochs, one directory per VM",
    )
    nbd_host: str = "127.0.0.1"
    nbd_port: int = Field(default=10809, ge=0, le=65535, description="0 picks a free port")
    nbd_unix_socket: Path | None = Field(default=None, description="also serve on this socket")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8100, ge=0, le=65535)

    linger_ms: float = Field(default=5.0, ge=0, description="how long a frame waits to fill")
    frame_max_bytes: int = Field(default=1 << 20, ge=64 << 10, description="frame size bound")
    buffer_max_bytes: int = Field(
        default=256 << 20, ge=1 << 20, description="unacknowledged bytes held in memory"
    )
    outage_policy: OutagePolicy = OutagePolicy.TRACK
    outage_timeout_s: float = Field(
        default=10.0, gt=0, description="a frame unacknowledged this long means an outage"
    )
    reconnect_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_interval_s: float = Field(
        default=1.0,
        ge=0,
        description=(
            "after this long without a record, publish a HEARTBEAT marker so the target's "
            "RPO stays bounded (and grows when the pipeline stalls) while the guest is idle; "
            "0: never"
        ),
    )
    kafka_request_timeout_s: float = Field(default=15.0, gt=0)
    fast_writes: bool = Field(
        default=True,
        description=(
            "plain writes to a file or block device into a hot extent take the C write path "
            "(vib/_fast_writes.c); false: every write takes the Python one"
        ),
    )

    extent_size: int = Field(default=4 << 20, description="activity log extent (power of 2)")
    activity_log_slots: int = Field(
        default=1024,
        ge=1,
        le=ACTIVITY_LOG_MAX_SLOTS,
        description="extents that can be hot at once (each names extent_size of disk)",
    )
    retire_interval_s: float = Field(default=1.0, gt=0)
    writeback_interval_s: float = Field(
        default=1.0,
        ge=0,
        description=(
            "write the source disks' dirty pages back this often (a flush, off the I/O "
            "loop), so the page cache holds about this much of the guest's writes: the "
            "kernel's own write-back releases 30 s of them at once, and every fsync on the "
            "host waits behind that burst; 0: leave it to the kernel"
        ),
    )
    writeback_max_bytes: int = Field(
        default=64 << 20,
        gt=0,
        description=(
            "leave write-back to the kernel after an interval in which the VM wrote more "
            "than this: flushing a burst fills the disk's queue, and guest writes that "
            "wait for an activity log commit wait behind it"
        ),
    )
    bitmap_granularity: int = Field(default=64 << 10, description="bytes per dirty bit")
    resync_chunk_bytes: int = Field(default=1 << 20, ge=4096)
    resync_max_bytes_per_s: int = Field(
        default=0, ge=0, description="bound on data a resync reads per second (0: none)"
    )

    full_sync_on_first_protect: bool = True
    act_on_resync_requests: bool = Field(
        default=True,
        description=(
            "start a full sync of a VM when the receiver (a sequence gap, a corrupt "
            "message, a sequence regression) or the applier (a hole only it sees) asks "
            "for a resync on a site's status topic, until the control plane decides this"
        ),
    )
    create_topics: bool = Field(default=True, description="create the VMs' missing topics")
    producer_process: bool | None = Field(
        default=None,
        description=(
            "run each VM's Kafka producer in a child process, off the I/O loop; "
            "unset: only where there are cores to spare (4 or more)"
        ),
    )

    def use_producer_process(self) -> bool:
        if self.producer_process is not None:
            return self.producer_process
        # Measured on 2 cores (guest, broker and tap sharing them): the child's extra
        # hop (a copy through a socket pair) costs more than it saves; with more cores it
        # takes even the producer's calls and reports off the loop that serves the guest.
        return (os.cpu_count() or 1) >= 4

    @model_validator(mode="after")
    def _check(self) -> Self:
        _power_of_two(self.extent_size, "extent_size")
        _power_of_two(self.bitmap_granularity, "bitmap_granularity")
        if self.bitmap_granularity > self.extent_size:
            raise ValueError("bitmap_granularity must not exceed extent_size")
        if self.buffer_max_bytes < 2 * self.frame_max_bytes:
            raise ValueError("buffer_max_bytes must hold at least two frames")
        return self
