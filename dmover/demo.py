"""`make demo`: the product's story on one machine, end to end, with real parts.

Starts both sites and every service, protects a thin disk, writes a real ext4
filesystem through the tap with qemu-img, shows live lag and RPO while the chain
drains, then verifies the replica: `qemu-img compare` source against target,
`e2fsck -fn` on the target, and that the target stayed thin.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from datapath.protection import load_protection_plan
from dmover.local import (
    DeploymentError,
    Endpoints,
    LocalDeployment,
    is_drained,
    replication_positions,
)

REPO = Path(__file__).resolve().parent.parent


class DemoError(RuntimeError):
    pass


@dataclass
class Figures:
    written_bytes: int = 0
    write_seconds: float = 0.0
    drain_seconds: float = 0.0
    rpo_samples: list[float] = field(default_factory=list)
    target_allocated: int = 0
    disk_size: int = 0

    def rpo_p(self, q: float) -> float:
        if not self.rpo_samples:
            return 0.0
        ordered = sorted(self.rpo_samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_demo(root: Path, *, disk_size: int, console: Console) -> int:
    if root.exists():
        shutil.rmtree(root)
    deployment = LocalDeployment(root, disk_size=disk_size)
    try:
        with console.status("starting the source and target sites (Kafka) and the services..."):
            endpoints = deployment.start()
    except DeploymentError as exc:
        console.print(f"[red]the local deployment did not start:[/red] {exc}")
        return 1
    try:
        plan = load_protection_plan(endpoints.plan)
        vm = plan.vms[0]
        disk = vm.disks[0]
        applier = endpoints.services["applier"]
        export = f"{endpoints.nbd}/{vm.id}/{disk.name}"
        console.print(
            f"protected VM [bold]{vm.id}[/bold], disk {disk.name} "
            f"({disk_size >> 20} MiB, thin), served at {export}"
        )
        figures = Figures(disk_size=disk_size)
        with httpx.Client(timeout=5.0) as http:
            _drain(http, endpoints, vm.id, console, figures, "initial sync")
            with tempfile.TemporaryDirectory() as tmp:
                image = _build_filesystem(Path(tmp), disk_size, console)
                figures.written_bytes = _allocated(image)
                console.print("writing the filesystem through the tap with qemu-img convert...")
                start = time.monotonic()
                writer = subprocess.Popen(
                    ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), export],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                _watch(http, endpoints, vm.id, console, figures, writer)
                figures.write_seconds = time.monotonic() - start
            start = time.monotonic()
            _drain(http, endpoints, vm.id, console, figures, "replication")
            figures.drain_seconds = time.monotonic() - start
            _verify(http, applier, vm.id, disk.source, disk.target, console, figures)
        _print_figures(console, figures)
        return 0
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        console.print(f"service logs are in {root / 'logs'}")
        return 1
    finally:
        with console.status("stopping..."):
            deployment.stop()


def _build_filesystem(tmp: Path, size: int, console: Console) -> Path:
    """An ext4 image holding this repository's sources and some incompressible data."""
    content = tmp / "content"
    for part in ("datapath", "vib", "services", "dmover", "docs"):
        shutil.copytree(
            REPO / part, content / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    blobs = content / "blobs"
    blobs.mkdir()
    for i in range(8):
        (blobs / f"blob-{i}.bin").write_bytes(os.urandom(min(size // 32, 4 << 20)))
    image = tmp / "fs.img"
    _run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(content), str(image), f"{size // 1024}k"],
        "mke2fs",
    )
    console.print(f"built an ext4 filesystem image ({_allocated(image) >> 20} MiB allocated)")
    return image


def _positions(
    http: httpx.Client, endpoints: Endpoints, vm_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return replication_positions(http, endpoints, vm_id)
    except httpx.HTTPError as exc:
        raise DemoError(f"a service did not answer /status: {exc}") from exc


def _table(tap_vm: dict[str, Any], applier_vm: dict[str, Any], what: str) -> Table:
    table = Table(title=f"Datamover — {what}")
    for column in ("tap seq", "acked", "applied", "lag batches", "lag MiB", "RPO s", "mode"):
        table.add_column(column, justify="right")
    table.add_row(
        str(tap_vm["last_seq_assigned"]),
        str(tap_vm["last_seq_acknowledged"]),
        str(applier_vm["applied_seq"]),
        str(applier_vm["lag_batches"]),
        f"{applier_vm['lag_bytes'] / 2**20:.1f}",
        f"{applier_vm['rpo_seconds']:.3f}",
        str(tap_vm["mode"]),
    )
    return table


def _watch(
    http: httpx.Client,
    endpoints: Endpoints,
    vm_id: str,
    console: Console,
    figures: Figures,
    writer: subprocess.Popen[bytes],
) -> None:
    with Live(console=console, refresh_per_second=8) as live:
        while writer.poll() is None:
            tap_vm, applier_vm = _positions(http, endpoints, vm_id)
            figures.rpo_samples.append(float(applier_vm["rpo_seconds"]))
            live.update(_table(tap_vm, applier_vm, "writing through the tap"))
            time.sleep(0.1)
    console.line()
    if writer.returncode != 0:
        output = writer.stdout.read().decode(errors="replace") if writer.stdout else ""
        raise DemoError(f"qemu-img convert failed ({writer.returncode}): {output}")


def _drain(
    http: httpx.Client,
    endpoints: Endpoints,
    vm_id: str,
    console: Console,
    figures: Figures,
    what: str,
    timeout: float = 300.0,
) -> None:
    deadline = time.monotonic() + timeout
    try:
        with Live(console=console, refresh_per_second=8) as live:
            _drain_loop(http, endpoints, vm_id, figures, what, live, deadline, timeout)
    finally:
        console.line()


def _drain_loop(
    http: httpx.Client,
    endpoints: Endpoints,
    vm_id: str,
    figures: Figures,
    what: str,
    live: Live,
    deadline: float,
    timeout: float,
) -> None:
    while True:
        tap_vm, applier_vm = _positions(http, endpoints, vm_id)
        live.update(_table(tap_vm, applier_vm, f"{what}: draining to the target"))
        figures.rpo_samples.append(float(applier_vm["rpo_seconds"]))
        if applier_vm.get("health") not in (None, "ok", "healthy"):
            raise DemoError(f"the applier reports {applier_vm['health']}: {applier_vm['reason']}")
        caught_up = is_drained(tap_vm, applier_vm)
        if caught_up:
            return
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not drain in {timeout:.0f}s")
        time.sleep(0.1)


def _verify(
    http: httpx.Client,
    applier: str,
    vm_id: str,
    source: str,
    target: str,
    console: Console,
    figures: Figures,
) -> None:
    # The applier answers once the unit in progress is durable (up to its pause timeout).
    response = http.post(f"{applier}/vms/{vm_id}/pause", timeout=90.0)
    if response.status_code >= 300:
        raise DemoError(f"pausing the applier failed: {response.text}")
    try:
        _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, target], "qemu-img compare")
        console.print("[green]qemu-img compare: the target equals the source[/green]")
        _run(["e2fsck", "-fn", target], "e2fsck -fn")
        console.print("[green]e2fsck -fn: the replicated filesystem is clean[/green]")
        figures.target_allocated = _allocated(Path(target))
    finally:
        http.post(f"{applier}/vms/{vm_id}/resume")


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoError(f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}")


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _print_figures(console: Console, f: Figures) -> None:
    table = Table(title="Datamover demo — figures")
    table.add_column("figure")
    table.add_column("value", justify="right")
    mib = f.written_bytes / 2**20
    table.add_row("filesystem data written through the tap", f"{mib:.1f} MiB")
    table.add_row("write time (qemu-img convert)", f"{f.write_seconds:.2f} s")
    table.add_row("drain time after the writer finished", f"{f.drain_seconds:.2f} s")
    table.add_row(
        "protected throughput", f"{mib / max(f.write_seconds + f.drain_seconds, 1e-9):.1f} MiB/s"
    )
    table.add_row(
        "RPO p50 / p99 / max (sampled)",
        f"{f.rpo_p(0.5):.3f} / {f.rpo_p(0.99):.3f} / {max(f.rpo_samples, default=0):.3f} s",
    )
    table.add_row(
        "target allocated / disk size",
        f"{f.target_allocated / 2**20:.1f} / {f.disk_size / 2**20:.0f} MiB (thin)",
    )
    console.print(table)
    if f.rpo_samples:
        console.print(
            f"RPO samples: {len(f.rpo_samples)}, mean {statistics.fmean(f.rpo_samples):.3f} s"
        )
