"""``dmover transceiver``: run the transceiver service (wired into the CLI by dmover/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from datapath.service import host_option, log_level_option, plan_option, port_option, serve

from .app import create_app
from .settings import TransceiverSettings


def transceiver_command(
    plan: Annotated[Path | None, plan_option(TransceiverSettings)] = None,
    host: Annotated[str | None, host_option(TransceiverSettings)] = None,
    port: Annotated[int | None, port_option(TransceiverSettings)] = None,
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
    log_level: Annotated[str, log_level_option()] = "INFO",
) -> None:
    """Copy the VMs' batch topics from the source cluster to the target, exactly once.

    Every setting can also come from its DM_TRANSCEIVER_* environment variable; an
    option given here wins."""
    serve(
        create_app,
        TransceiverSettings,
        log_level,
        plan=plan,
        http_host=host,
        http_port=port,
        mode=mode,
        interval_s=interval,
        bandwidth_bytes_per_s=bandwidth,
    )
