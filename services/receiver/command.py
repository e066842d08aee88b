"""``dmover receiver``: run the receiver service (wired into the CLI by dmover/cli.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from datapath.service import configure_logging, load_settings, run_app

from .app import create_app
from .settings import ReceiverSettings

log = logging.getLogger(__name__)


def receiver_command(
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help="protection plan file (YAML or TOML) [DM_RECEIVER_PLAN]"),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(help="HTTP address for /health /ready /metrics [default: 127.0.0.1]"),
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [default: 8101]")] = None,
    instance_id: Annotated[
        str | None,
        typer.Option(help="static group member id, unique per receiver (fast restarts)"),
    ] = None,
    batch_interval: Annotated[
        float | None, typer.Option(help="seconds between batch cuts (default: batch_interval_s)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    """Fold the tap topics of the protected VMs into consistency batches, exactly once.

    Every setting can also come from its DM_RECEIVER_* environment variable; an option
    given here wins."""
    configure_logging(log_level)
    settings = load_settings(
        ReceiverSettings,
        plan=plan,
        http_host=host,
        http_port=port,
        instance_id=instance_id,
        batch_interval_s=batch_interval,
    )
    log.info("receiver settings: %s", settings.model_dump_json())
    run_app(
        create_app(settings), settings.http_host, settings.http_port, log_level=log_level.lower()
    )
