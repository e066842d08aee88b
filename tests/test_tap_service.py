"""The tap as a service: settings from DM_TAP_*, the command, bad requests (guarantee 7)
and a cluster that is unreachable from the start (the guest is served regardless)."""

from __future__ import annotations

import asyncio
import ctypes
import os
from pathlib import Path

import nbd
import pytest
import typer
from prometheus_client import generate_latest
from pydantic import ValidationError
from tap_helpers import (
    DiskSpec,
    MiB,
    assert_replay_equals_source,
    nbd_uri,
    replay_onto_files,
    run,
    running_tap,
    tap_settings,
    wait_caught_up,
    wait_until,
    write_plan,
)
from typer.testing import CliRunner

from datapath.kafka import KafkaClusterSettings
from datapath.localsite import free_loopback_ports
from vib.command import tap_command
from vib.settings import OutagePolicy, TapSettings
from vib.vm_tap import Mode


def test_settings_come_from_the_dm_tap_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DM_TAP_PLAN", str(tmp_path / "plan.yaml"))
    monkeypatch.setenv("DM_TAP_LINGER_MS", "7.5")
    monkeypatch.setenv("DM_TAP_OUTAGE_POLICY", "backpressure")
    monkeypatch.setenv("DM_TAP_BUFFER_MAX_BYTES", str(64 * MiB))
    settings = TapSettings()  # type: ignore[call-arg]
    assert settings.plan == tmp_path / "plan.yaml"
    assert settings.linger_ms == 7.5
    assert settings.outage_policy is OutagePolicy.BACKPRESSURE
    assert settings.buffer_max_bytes == 64 * MiB
    assert settings.http_port == 8100


def test_inconsistent_settings_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="extent_size must be a power of two"):
        TapSettings(plan=tmp_path / "p.yaml", extent_size=3 * MiB)
    with pytest.raises(ValidationError, match="bitmap_granularity must not exceed"):
        TapSettings(plan=tmp_path / "p.yaml", extent_size=MiB, bitmap_granularity=2 * MiB)


def test_the_tap_command_offers_the_documented_options() -> None:
    app = typer.Typer()
    app.command()(tap_command)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for option in ("--plan", "--host", "--port", "--nbd-port", "--nbd-socket", "--state-dir"):
        assert option in result.output


async def test_a_refused_request_costs_no_sequence_number(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    disks = [DiskSpec("d0", tmp_path / "src.img", 8 * MiB)]
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    async with running_tap(tap_settings(tmp_path, plan)) as tap:
        await wait_caught_up(tap, vm_id)
        uri = nbd_uri(tap.nbd_port, vm_id, "d0")

        def client_session() -> str:
            handle = nbd.NBD()
            handle.set_strict_mode(0)  # let the bad request reach the server
            handle.connect_uri(uri)
            handle.pwrite(b"\x01" * 4096, 0)
            try:
                handle.pwrite(b"\x02" * 4096, 8 * MiB - 1024)  # runs past the end
            except nbd.Error as exc:
                refused = str(exc)
            else:
                refused = ""
            handle.pwrite(b"\x03" * 4096, 4096)
            handle.flush()
            handle.shutdown()
            return refused

        refused = await asyncio.to_thread(client_session)
        assert refused, "the write past the end was accepted"
        await wait_caught_up(tap, vm_id)
    result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert_replay_equals_source(result, [(disks[0].path, replays[0])])
    assert result.counts["WRITE"] == 2


async def test_the_guest_is_served_while_kafka_was_never_reachable(
    vm_id: str, tmp_path: Path
) -> None:
    nowhere = KafkaClusterSettings(bootstrap_servers=f"127.0.0.1:{free_loopback_ports(1)[0]}")
    disks = [DiskSpec("d0", tmp_path / "src.img", 16 * MiB)]
    plan = write_plan(tmp_path / "plan.yaml", nowhere, vm_id, disks)
    async with running_tap(tap_settings(tmp_path, plan)) as tap:
        assert tap.ready()
        await run(
            "qemu-io",
            "-f",
            "raw",
            f"nbd+unix:///{vm_id}/d0?socket={tmp_path / 'tap.sock'}",
            "-c",
            "write -P 0x42 1M 3M",
            "-c",
            "flush",
        )
        await wait_until(
            lambda: bool(tap.taps[vm_id].last_error), "the tap to give up reaching Kafka once"
        )
        vm = tap.taps[vm_id].status()
    assert vm["mode"] == Mode.TRACKING
    assert vm["dirty_bytes"] == 16 * MiB  # a first protection: the whole disk is pending
    assert vm["full_sync_pending"]
    assert "cannot reach the tap topic" in vm["last_error"]
    with (tmp_path / "src.img").open("rb") as f:
        f.seek(MiB)
        assert f.read(3 * MiB) == b"\x42" * (3 * MiB)


async def test_a_full_sync_requested_before_a_crash_is_not_lost(vm_id: str, tmp_path: Path) -> None:
    """A crash between 'full sync requested' and durable bitmap marks: the next start marks
    the bitmaps again rather than trusting them."""
    nowhere = KafkaClusterSettings(bootstrap_servers=f"127.0.0.1:{free_loopback_ports(1)[0]}")
    disks = [DiskSpec("d0", tmp_path / "src.img", 4 * MiB)]
    plan = write_plan(tmp_path / "plan.yaml", nowhere, vm_id, disks)
    settings = tap_settings(tmp_path, plan)
    async with running_tap(settings) as tap:
        assert tap.taps[vm_id].dirty_bytes() == 4 * MiB
    state = tmp_path / "state" / vm_id
    bitmap = state / "d0.bitmap"
    # As if the host crashed before the marks reached the disk.
    size = bitmap.stat().st_size
    with bitmap.open("r+b") as f:
        f.seek(4096)
        f.write(bytes(size - 4096))
    (state / "full_sync").write_text("requested\n")
    async with running_tap(settings) as tap:
        vm = tap.taps[vm_id]
        assert vm.dirty_bytes() == 4 * MiB
        assert vm.full_sync_pending
    assert (state / "full_sync").read_text().strip() == "marked"


_SYS_CACHESTAT = 451  # x86_64 and aarch64 alike


def _dirty_pages(path: Path) -> int:
    """Dirty page-cache pages of a file, by cachestat(2) (Linux 6.5)."""

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_uint64)
            for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    whole, stat = Range(0, 0), Stat()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(stat), 0) != 0:
            pytest.skip(f"cachestat: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return int(stat.dirty)


async def test_the_source_disk_is_written_back_as_the_guest_writes(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    disks = [DiskSpec("d0", tmp_path / "src.img", 16 * MiB)]
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    settings = tap_settings(tmp_path, plan, writeback_interval_s=0.2)
    async with running_tap(settings) as tap:
        await wait_caught_up(tap, vm_id)
        vm = tap.taps[vm_id]

        def write_without_flush() -> None:
            handle = nbd.NBD()
            handle.connect_uri(nbd_uri(tap.nbd_port, vm_id, "d0"))
            for offset in range(0, 8 * MiB, MiB):
                handle.pwrite(b"\x5a" * MiB, offset)
            handle.shutdown()

        rounds = vm.stats.writebacks
        await asyncio.to_thread(write_without_flush)
        # The kernel would keep the pages dirty for 30 s (dirty_expire_centisecs).
        await wait_until(lambda: _dirty_pages(disks[0].path) == 0, "the pages written back", 10)
        assert vm.stats.writebacks > rounds
        await wait_caught_up(tap, vm_id)
        idle = vm.stats.writebacks
        await asyncio.sleep(1.0)
        assert vm.stats.writebacks == idle, "a disk the guest did not write was flushed"
        metrics = generate_latest(tap.registry).decode()
        assert f'datamover_tap_writebacks_total{{vm="{vm_id}"}} {float(idle)}' in metrics


async def test_a_burst_larger_than_writeback_max_bytes_is_left_to_the_kernel(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    disks = [DiskSpec("d0", tmp_path / "src.img", 16 * MiB)]
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    settings = tap_settings(tmp_path, plan, writeback_interval_s=0.2, writeback_max_bytes=2 * MiB)
    async with running_tap(settings) as tap:
        await wait_caught_up(tap, vm_id)
        vm = tap.taps[vm_id]
        uri = nbd_uri(tap.nbd_port, vm_id, "d0")
        rounds = vm.stats.writebacks

        def write(size: int) -> None:
            handle = nbd.NBD()
            handle.connect_uri(uri)
            handle.pwrite(b"\x33" * size, 0)  # one request: it falls in one interval
            handle.shutdown()

        await asyncio.to_thread(write, 4 * MiB)
        await asyncio.sleep(1.0)
        assert vm.stats.writebacks == rounds, "a 4 MiB burst was flushed"
        await asyncio.to_thread(write, MiB)
        await wait_until(lambda: vm.stats.writebacks > rounds, "a flush after a small write", 10)
