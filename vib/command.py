"""`dmover tap`: run the I/O tap (wired into the CLI by dmover/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datapath.service import host_option, log_level_option, plan_option, port_option, serve
from vib.service import create_app
from vib.settings import TapSettings


def tap_command(
    plan: Annotated[Path | None, plan_option(TapSettings)] = None,
    host: Annotated[str | None, host_option(TapSettings)] = None,
    port: Annotated[int | None, port_option(TapSettings)] = None,
    nbd_host: Annotated[
        str | None,
        typer.Option(help="NBD address", show_default="--host if given, else DM_TAP_NBD_HOST"),
    ] = None,
    nbd_port: Annotated[
        int | None,
        typer.Option(
            help="NBD TCP port, 0 picks one",
            show_default=str(TapSettings.model_fields["nbd_port"].default),
        ),
    ] = None,
    nbd_socket: Annotated[
        Path | None, typer.Option(help="also serve NBD on this Unix socket")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="activity logs, bitmaps, epochs (default /var/lib/datamover/tap)"),
    ] = None,
    log_level: Annotated[str, log_level_option()] = "INFO",
) -> None:
    """Serve the protected disks over NBD; sequence and publish every write to Kafka.

    Every setting can also come from its DM_TAP_* environment variable; an option given
    here wins."""
    serve(
        create_app,
        TapSettings,
        log_level,
        plan=plan,
        http_host=host,
        http_port=port,
        nbd_host=nbd_host if nbd_host is not None else host,
        nbd_port=nbd_port,
        nbd_unix_socket=nbd_socket,
        state_dir=state_dir,
    )
