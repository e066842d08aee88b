"""The applier's settings: environment variables DM_APPLIER_*, overridden by the
command line (`dmover applier --help`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.applier.vm import ApplyTuning


class ApplierSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DM_APPLIER_", env_nested_delimiter="__")

    plan: Path = Field(description="protection plan file (YAML or TOML)")
    state_dir: Path = Field(
        default=Path("/var/lib/datamover/applier"),
        description="where the applied position of each VM is kept (one small file per VM)",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8103, ge=0, le=65535)
    fetch_timeout_s: float = Field(default=0.5, gt=0, description="longest wait for a batch")
    max_unit_bytes: int = Field(
        default=64 << 20,
        ge=1 << 20,
        description="batches applied under one intent and one fsync, at most this many bytes",
    )
    end_offset_interval_s: float = Field(
        default=1.0, gt=0, description="how often the end of each journal is checked (lag, RPO)"
    )
    pause_timeout_s: float = Field(default=60.0, gt=0)
    status_site: Literal["target", "source", "none"] = Field(
        default="target",
        description="the cluster whose status topic receives the applier's VM reports",
    )
    create_topics: bool = Field(
        default=True,
        description="create a VM's journal topic (and the status topic) when missing",
    )
    restart_backoff_s: float = Field(
        default=1.0, gt=0, description="first wait before a failed VM loop restarts"
    )
    max_restart_backoff_s: float = Field(default=30.0, gt=0)

    def tuning(self) -> ApplyTuning:
        return ApplyTuning(
            fetch_timeout_s=self.fetch_timeout_s,
            max_unit_bytes=self.max_unit_bytes,
            end_offset_interval_s=self.end_offset_interval_s,
            pause_timeout_s=self.pause_timeout_s,
        )
