"""`dmover`: the command line of every Datamover part."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

from datapath.localsite import log_tail
from datapath.service import configure_logging
from dmover.local import STATE_FILE, DeploymentError, LocalDeployment, read_state
from services.applier.command import applier_command
from services.receiver.command import receiver_command
from services.transceiver.command import transceiver_command
from vib.command import tap_command

app = typer.Typer(
    help="Datamover: continuous, crash-consistent replication of VM disks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
local_app = typer.Typer(
    help="A whole deployment on this machine (both sites, every service).", no_args_is_help=True
)
app.add_typer(local_app, name="local")
app.command("tap")(tap_command)
app.command("receiver")(receiver_command)
app.command("transceiver")(transceiver_command)
app.command("applier")(applier_command)
console = Console()

LocalDir = Annotated[Path, typer.Option("--dir", help="where the local deployment keeps its state")]
DEFAULT_LOCAL_DIR = Path(".local")


@local_app.command("up")
def local_up(directory: LocalDir = DEFAULT_LOCAL_DIR, timeout: float = 180.0) -> None:
    """Start both sites and every service in the background; print the endpoints."""
    directory = directory.resolve()
    if (state := read_state(directory)) is not None and _alive(state.pids.get("supervisor")):
        console.print(f"already running in {directory}")
        _print_endpoints(directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    log_path = directory / "local.log"
    with log_path.open("ab") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "dmover", "local", "run", "--dir", str(directory)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    with console.status("starting the source and target sites and the services..."):
        while read_state(directory) is None:
            if supervisor.poll() is not None or time.monotonic() > deadline:
                if supervisor.poll() is None:
                    # Still starting: stopped, or it would finish later with nobody to
                    # stop it (`local down` finds no state until it has written one).
                    supervisor.terminate()
                    try:
                        supervisor.wait(60)
                    except subprocess.TimeoutExpired:
                        supervisor.kill()
                console.print(f"[red]local deployment failed to start[/red]\n{log_tail(log_path)}")
                raise typer.Exit(1)
            time.sleep(0.3)
    _print_endpoints(directory)


@local_app.command("run")
def local_run(directory: LocalDir = DEFAULT_LOCAL_DIR) -> None:
    """Run the local deployment in the foreground until SIGTERM or Ctrl-C."""
    configure_logging("INFO")
    deployment = LocalDeployment(directory)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        deployment.start()
    except DeploymentError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        deployment.stop()


@local_app.command("down")
def local_down(directory: LocalDir = DEFAULT_LOCAL_DIR, timeout: float = 180.0) -> None:
    """Stop the local deployment started by `dmover local up`."""
    state = read_state(directory.resolve())
    pid = state.pids.get("supervisor") if state else None
    if pid is None or not _alive(pid):
        console.print("no local deployment is running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with console.status("stopping..."):
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    if _alive(pid):
        console.print(f"[red]supervisor {pid} still running after {timeout}s[/red]")
        raise typer.Exit(1)
    console.print("stopped")


@local_app.command("status")
def local_status(directory: LocalDir = DEFAULT_LOCAL_DIR) -> None:
    """Show the local deployment's endpoints and whether each part answers."""
    if read_state(directory.resolve()) is None:
        console.print("no local deployment is running")
        raise typer.Exit(1)
    _print_endpoints(directory.resolve())


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _print_endpoints(directory: Path) -> None:
    state = read_state(directory)
    if state is None:
        return
    table = Table(title=f"Datamover local deployment ({directory})")
    table.add_column("part")
    table.add_column("endpoint")
    table.add_column("state")
    table.add_row("source site Kafka", state.source_kafka, "")
    table.add_row("target site Kafka", state.target_kafka, "")
    table.add_row("tap NBD", f"{state.nbd}  nbd+unix:///?socket={state.nbd_socket}", "")
    for name, url in state.services.items():
        try:
            ok = httpx.get(f"{url}/ready", timeout=2.0).status_code == 200
            health = "[green]ready[/green]" if ok else "[yellow]not ready[/yellow]"
        except httpx.HTTPError:
            health = "[red]down[/red]"
        table.add_row(name, url, health)
    table.add_row("protection plan", state.plan, "")
    console.print(table)


@app.command("demo")
def demo(
    directory: Annotated[Path, typer.Option("--dir")] = Path(".local/demo"),
    size_mib: int = 256,
) -> None:
    """Protect a disk, replicate a real filesystem written through the tap, verify it."""
    from dmover.demo import run_demo

    raise typer.Exit(
        run_demo(directory.resolve(), disk_size=size_mib * 1024 * 1024, console=console)
    )
