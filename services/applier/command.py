"""`dmover applier`: serve the applier (the lead wires this function into the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datapath.service import host_option, log_level_option, plan_option, port_option, serve
from services.applier.app import create_app
from services.applier.settings import ApplierSettings


def applier_command(
    plan: Annotated[Path | None, plan_option(ApplierSettings)] = None,
    host: Annotated[str | None, host_option(ApplierSettings, "host")] = None,
    port: Annotated[int | None, port_option(ApplierSettings, "port")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="applied positions (default: DM_APPLIER_STATE_DIR or built-in)"),
    ] = None,
    status_site: Annotated[
        str | None, typer.Option(help="status topic cluster: target, source or none")
    ] = None,
    log_level: Annotated[str, log_level_option()] = "INFO",
) -> None:
    """Apply each protected VM's batches, whole and in order, to its target disks.

    Every setting can also come from its DM_APPLIER_* environment variable; an option
    given here wins."""
    serve(
        create_app,
        ApplierSettings,
        log_level,
        host_field="host",
        port_field="port",
        plan=plan,
        host=host,
        port=port,
        state_dir=state_dir,
        status_site=status_site,
    )
