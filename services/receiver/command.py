"""``dmover receiver``: run the receiver service (wired into the CLI by dmover/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datapath.service import host_option, log_level_option, plan_option, port_option, serve

from .app import create_app
from .settings import ReceiverSettings


def receiver_command(
    plan: Annotated[Path | None, plan_option(ReceiverSettings)] = None,
    host: Annotated[str | None, host_option(ReceiverSettings)] = None,
    port: Annotated[int | None, port_option(ReceiverSettings)] = None,
    instance_id: Annotated[
        str | None,
        typer.Option(help="static group member id, unique per receiver (fast restarts)"),
    ] = None,
    batch_interval: Annotated[
        float | None, typer.Option(help="seconds between batch cuts (default: batch_interval_s)")
    ] = None,
    log_level: Annotated[str, log_level_option()] = "INFO",
) -> None:
    """Fold the tap topics of the protected VMs into consistency batches, exactly once.

    Every setting can also come from its DM_RECEIVER_* environment variable; an option
    given here wins."""
    serve(
        create_app,
        ReceiverSettings,
        log_level,
        plan=plan,
        http_host=host,
        http_port=port,
        instance_id=instance_id,
        batch_interval_s=batch_interval,
    )
