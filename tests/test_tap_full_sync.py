"""Guarantees 4 and 5 for the full sync: a disk that already holds data when it is first
protected travels in one resync bracket, only its allocated non-zero blocks as data,
holes and zero blocks as ZERO ranges; an operator can ask for another full sync."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from tap_helpers import (
    DiskSpec,
    MiB,
    assert_replay_equals_source,
    caught_up,
    nbd_uri,
    replay_onto_files,
    run,
    tap_settings,
    wait_until,
    write_plan,
)

from datapath.kafka import KafkaClusterSettings
from vib.service import create_app
from vib.tap_worker import TapWorker

DATA_OFFSETS = [0, 5 * MiB, 17 * MiB + 64 * 1024, 99 * MiB, 128 * MiB, 200 * MiB, 250 * MiB]
PIECE = 256 * 1024


def sparse_disk_with_data(path: Path, size: int) -> int:
    """A sparse image with random data in a few places and allocated zeros in one."""
    with path.open("wb") as f:
        f.truncate(size)
        for offset in DATA_OFFSETS:
            f.seek(offset)
            f.write(os.urandom(PIECE))
        f.seek(150 * MiB)
        f.write(bytes(MiB))  # allocated, but zeros: must not travel as data
    return len(DATA_OFFSETS) * PIECE


async def test_first_protection_sends_only_allocated_nonzero_blocks(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    disks = [DiskSpec("d0", tmp_path / "src.img", 256 * MiB)]
    data_bytes = sparse_disk_with_data(disks[0].path, disks[0].size)
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    worker = TapWorker(tap_settings(tmp_path, plan))
    await worker.start()
    try:
        vm = worker.taps[vm_id]
        await wait_until(lambda: caught_up(vm.status()), "the full sync")
        status = vm.status()
    finally:
        await worker.stop()
    result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert_replay_equals_source(result, [(disks[0].path, replays[0])])
    assert result.bytes["SYNC_BLOCK"] == data_bytes
    assert result.bytes["ZERO"] == disks[0].size - data_bytes
    assert result.counts["WRITE"] == 0
    assert result.resyncs_started == result.resyncs_completed and len(result.resyncs_started) == 1
    sync = status["resync"]
    assert sync["kind"] == "full" and sync["state"] == "complete"
    assert sync["bytes_done"] == sync["bytes_total"] == disks[0].size
    assert sync["data_bytes_sent"] == data_bytes
    # The target stays thin: the replayed file holds about as much as the source data.
    assert os.stat(replays[0]).st_blocks * 512 < 4 * data_bytes


async def test_full_sync_on_demand_through_the_http_api(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    disks = [DiskSpec("d0", tmp_path / "src.img", 32 * MiB)]
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    app = create_app(tap_settings(tmp_path, plan))
    worker: TapWorker = app.state.worker
    await worker.start()  # what the app's lifespan does
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tap"
        ) as http:

            async def vm_status() -> dict[str, object]:
                response = await http.get("/status")
                assert response.status_code == 200
                vms: list[dict[str, object]] = response.json()["vms"]
                return vms[0]

            async def settled() -> bool:
                return caught_up(await vm_status())

            await wait_until(settled, "the first full sync")
            await run(
                "qemu-io",
                "-f",
                "raw",
                nbd_uri(worker.nbd_port, vm_id, "d0"),
                "-c",
                "write -P 0x3c 3M 2M",
                "-c",
                "write -P 0x3d 20M 1M",
            )
            await wait_until(settled, "the writes")
            assert (await http.post("/vms/no-such-vm/full-sync")).status_code == 404
            response = await http.post(f"/vms/{vm_id}/full-sync")
            assert response.status_code == 202
            await wait_until(settled, "the requested full sync")
            status = await vm_status()
            metrics = (await http.get("/metrics")).text
    finally:
        await worker.stop()
    result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert_replay_equals_source(result, [(disks[0].path, replays[0])])
    assert len(result.resyncs_completed) == 2
    assert result.bytes["SYNC_BLOCK"] == 3 * MiB  # only the second full sync had data
    sync = status["resync"]
    assert isinstance(sync, dict) and sync["kind"] == "full"
    assert sync["data_bytes_sent"] == 3 * MiB
    assert f'datamover_tap_writes_total{{op="write",vm="{vm_id}"}} 2.0' in metrics
    assert f'datamover_tap_mode{{mode="live",vm="{vm_id}"}} 1.0' in metrics
    assert "datamover_tap_publish_latency_seconds_bucket" in metrics
