"""`dmover tap`: run the I/O tap (wired into the CLI by dmover/cli.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from datapath.service import configure_logging, given, run_app
from vib.service import create_app
from vib.settings import TapSettings

log = logging.getLogger(__name__)


def tap_command(
    plan: Annotated[Path, typer.Option("--plan", help="protection plan file (YAML or TOML)")],
    host: Annotated[str, typer.Option(help="HTTP address for /health /ready /metrics")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="HTTP port")] = 8100,
    nbd_host: Annotated[str | None, typer.Option(help="NBD address (default: --host)")] = None,
    nbd_port: Annotated[int, typer.Option(help="NBD TCP port (0 picks one)")] = 10809,
    nbd_socket: Annotated[
        Path | None, typer.Option(help="also serve NBD on this Unix socket")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="activity logs, bitmaps, epochs (default /var/lib/datamover/tap)"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    """Serve the protected disks over NBD; sequence and publish every write to Kafka."""
    configure_logging(log_level)
    settings = TapSettings(
        plan=plan,
        http_host=host,
        http_port=port,
        nbd_host=nbd_host or host,
        nbd_port=nbd_port,
        **given(nbd_unix_socket=nbd_socket, state_dir=state_dir),
    )
    log.info("tap settings: %s", settings.model_dump_json())
    run_app(
        create_app(settings), settings.http_host, settings.http_port, log_level=log_level.lower()
    )
