"""`dmover tap`: run the I/O tap (wired into the CLI by dmover/cli.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from datapath.service import configure_logging, load_settings, run_app
from vib.service import create_app
from vib.settings import TapSettings

log = logging.getLogger(__name__)


def tap_command(
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help="protection plan file (YAML or TOML) [DM_TAP_PLAN]"),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(help="HTTP address for /health /ready /metrics [default: 127.0.0.1]"),
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [default: 8100]")] = None,
    nbd_host: Annotated[
        str | None, typer.Option(help="NBD address [default: --host if given, DM_TAP_NBD_HOST]")
    ] = None,
    nbd_port: Annotated[
        int | None, typer.Option(help="NBD TCP port, 0 picks one [default: 10809]")
    ] = None,
    nbd_socket: Annotated[
        Path | None, typer.Option(help="also serve NBD on this Unix socket")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="activity logs, bitmaps, epochs (default /var/lib/datamover/tap)"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    """Serve the protected disks over NBD; sequence and publish every write to Kafka.

    Every setting can also come from its DM_TAP_* environment variable; an option given
    here wins."""
    configure_logging(log_level)
    settings = load_settings(
        TapSettings,
        plan=plan,
        http_host=host,
        http_port=port,
        nbd_host=nbd_host if nbd_host is not None else host,
        nbd_port=nbd_port,
        nbd_unix_socket=nbd_socket,
        state_dir=state_dir,
    )
    log.info("tap settings: %s", settings.model_dump_json())
    run_app(
        create_app(settings), settings.http_host, settings.http_port, log_level=log_level.lower()
    )
