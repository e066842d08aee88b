"""``dmover transceiver``: run the transceiver service (wired into the CLI by dmover/cli.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

from datapath.service import configure_logging, load_settings, run_app

from .app import create_app
from .settings import TransceiverSettings

log = logging.getLogger(__name__)


def transceiver_command(
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help="protection plan file (YAML or TOML) [DM_TRANSCEIVER_PLAN]"),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(help="HTTP address for /health /ready /metrics [default: 127.0.0.1]"),
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [default: 8102]")] = None,
    mode: Annotated[
        Literal["continuous", "periodic"] | None,
        typer.Option(help="continuous (default) or periodic"),
    ] = None,
    interval: Annotated[
        float | None, typer.Option(help="periodic mode: seconds between copies")
    ] = None,
    bandwidth: Annotated[
        int | None, typer.Option(help="WAN throttle in bytes/s for this gateway pair")
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    """Copy the VMs' batch topics from the source cluster to the target, exactly once.

    Every setting can also come from its DM_TRANSCEIVER_* environment variable; an
    option given here wins."""
    configure_logging(log_level)
    settings = load_settings(
        TransceiverSettings,
        plan=plan,
        http_host=host,
        http_port=port,
        mode=mode,
        interval_s=interval,
        bandwidth_bytes_per_s=bandwidth,
    )
    log.info("transceiver settings: %s", settings.model_dump_json())
    run_app(
        create_app(settings), settings.http_host, settings.http_port, log_level=log_level.lower()
    )
