"""`dmover applier`: serve the applier (the lead wires this function into the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datapath.service import configure_logging, load_settings, run_app
from services.applier.app import create_app
from services.applier.settings import ApplierSettings


def applier_command(
    plan: Annotated[
        Path | None, typer.Option(help="protection plan file (YAML or TOML) [DM_APPLIER_PLAN]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="HTTP address [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [default: 8103]")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="applied positions (default: DM_APPLIER_STATE_DIR or built-in)"),
    ] = None,
    status_site: Annotated[
        str | None, typer.Option(help="status topic cluster: target, source or none")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Apply each protected VM's batches, whole and in order, to its target disks.

    Every setting can also come from its DM_APPLIER_* environment variable; an option
    given here wins."""
    configure_logging(log_level)
    settings = load_settings(
        ApplierSettings,
        plan=plan,
        host=host,
        port=port,
        state_dir=state_dir,
        status_site=status_site,
    )
    run_app(create_app(settings), settings.host, settings.port, log_level=log_level)
