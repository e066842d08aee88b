"""`dmover applier`: serve the applier (the lead wires this function into the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datapath.service import configure_logging, given, run_app
from services.applier.app import create_app
from services.applier.settings import ApplierSettings


def applier_command(
    plan: Annotated[Path, typer.Option(help="protection plan file (YAML or TOML)")],
    host: Annotated[str, typer.Option(help="HTTP address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8103,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="applied positions (default: DM_APPLIER_STATE_DIR or built-in)"),
    ] = None,
    status_site: Annotated[
        str | None, typer.Option(help="status topic cluster: target, source or none")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Apply each protected VM's batches, whole and in order, to its target disks."""
    settings = ApplierSettings(
        plan=plan, host=host, port=port, **given(state_dir=state_dir, status_site=status_site)
    )
    configure_logging(log_level)
    run_app(create_app(settings), settings.host, settings.port, log_level=log_level)
