"""`dmover applier`: serve the applier (the lead wires this function into the CLI)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from datapath.service import run_app
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
    overrides: dict[str, Any] = {"plan": plan, "host": host, "port": port}
    if state_dir is not None:
        overrides["state_dir"] = state_dir
    if status_site is not None:
        overrides["status_site"] = status_site
    settings = ApplierSettings(**overrides)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_app(create_app(settings), settings.host, settings.port, log_level=log_level)
