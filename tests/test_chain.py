"""The whole chain on real parts: NBD client -> tap -> source Kafka -> receiver ->
transceiver -> target Kafka -> applier -> target disk, each service a real process
started by `dmover` exactly as `dmover local up` starts it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import RecordsToDelete
from aiokafka.structs import TopicPartition

from datapath.kafka import Admin, Consumer, KafkaClusterSettings
from datapath.localsite import KafkaSite
from datapath.protection import load_protection_plan
from datapath.topics import Stream, topic_name
from dmover.local import Endpoints, LocalDeployment, replication_positions, wait_drained

REPO = Path(__file__).resolve().parent.parent
DISK_SIZE = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory, source_site: KafkaSite, target_site: KafkaSite
) -> Iterator[tuple[LocalDeployment, Endpoints]]:
    run = uuid.uuid4().hex[:8]
    deployment = LocalDeployment(
        tmp_path_factory.mktemp("chain"),
        disk_size=DISK_SIZE,
        vm_id=f"chain-{run}",
        kafka=(source_site.bootstrap, target_site.bootstrap),
        env={
            "DM_RECEIVER_GROUP_ID": f"receiver-{run}",
            "DM_RECEIVER_TRANSACTIONAL_ID_PREFIX": f"receiver-{run}",
            "DM_TRANSCEIVER_GATEWAY_PAIR": f"pair-{run}",
            "DM_TRANSCEIVER_TRANSACTIONAL_ID_PREFIX": f"transceiver-{run}",
        },
    )
    endpoints = deployment.start()
    try:
        yield deployment, endpoints
    finally:
        deployment.stop()


def _disk(chain: tuple[LocalDeployment, Endpoints]) -> tuple[str, str, str, str]:
    _, endpoints = chain
    vm = load_protection_plan(endpoints.plan).vms[0]
    disk = vm.disks[0]
    return vm.id, f"{endpoints.nbd}/{vm.id}/{disk.name}", disk.source, disk.target


def _run(argv: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, f"{argv[0]} failed: {result.stdout}\n{result.stderr}"
    return result.stdout


def _drain_and_pause(chain: tuple[LocalDeployment, Endpoints], vm_id: str) -> httpx.Client:
    _, endpoints = chain
    http = httpx.Client(timeout=30.0)
    wait_drained(http, endpoints, vm_id, timeout=240)
    response = http.post(f"{endpoints.services['applier']}/vms/{vm_id}/pause")
    assert response.status_code < 300, response.text
    return http


def _resume(chain: tuple[LocalDeployment, Endpoints], vm_id: str, http: httpx.Client) -> None:
    _, endpoints = chain
    http.post(f"{endpoints.services['applier']}/vms/{vm_id}/resume").raise_for_status()
    http.close()


def test_ext4_written_through_the_tap_is_replicated_consistent_and_thin(
    chain: tuple[LocalDeployment, Endpoints], tmp_path: Path
) -> None:
    vm_id, export, source, target = _disk(chain)
    content = tmp_path / "content"
    shutil.copytree(
        REPO / "datapath", content / "datapath", ignore=shutil.ignore_patterns("__pycache__")
    )
    (content / "random.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    image = tmp_path / "fs.img"
    _run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            str(content),
            str(image),
            f"{DISK_SIZE // 1024}k",
        ]
    )
    _run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), export])

    http = _drain_and_pause(chain, vm_id)
    try:
        _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, target])
        _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), target])
        _run(["e2fsck", "-fn", target])
        allocated = os.stat(target).st_blocks * 512
        # Thin: as little allocated as on the source (within a little metadata slack).
        source_allocated = os.stat(source).st_blocks * 512
        assert allocated <= source_allocated + 1024 * 1024, (
            f"target not thin: {allocated} bytes allocated, source {source_allocated}"
        )
        # And thin in itself: a source filled up as well would pass the check above.
        assert allocated < DISK_SIZE // 2, f"target not thin: {allocated} bytes allocated"

    finally:
        _resume(chain, vm_id, http)


def test_fio_verify_through_the_tap_then_verify_only_on_the_target(
    chain: tuple[LocalDeployment, Endpoints], tmp_path: Path
) -> None:
    vm_id, export, source, target = _disk(chain)
    host_port = export.removeprefix("nbd://").split("/", 1)[0]
    export_name = export.split("/", 3)[3]
    job = [
        "--name=chain",
        "--rw=randwrite",
        "--bs=4k",
        "--size=16m",
        "--offset=32m",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--randseed=42",
        "--direct=0",
    ]
    _run(
        ["fio", "--ioengine=nbd", f"--uri=nbd://{host_port}/{export_name}", "--iodepth=16", *job],
        cwd=tmp_path,
    )

    http = _drain_and_pause(chain, vm_id)
    try:
        _run(
            ["fio", "--ioengine=psync", f"--filename={target}", "--verify_only", *job], cwd=tmp_path
        )
        _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, target])
    finally:
        _resume(chain, vm_id, http)


def _applier_vm(http: httpx.Client, endpoints: Endpoints, vm_id: str) -> dict[str, Any]:
    response = http.get(f"{endpoints.services['applier']}/vms/{vm_id}")
    response.raise_for_status()
    status: dict[str, Any] = response.json()
    return status


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_idle_vm_keeps_a_bounded_rpo_and_a_stalled_pipeline_shows_a_growing_one(
    chain: tuple[LocalDeployment, Endpoints],
) -> None:
    """The tap's heartbeats reach the target while the guest writes nothing: the applied
    position keeps moving and the RPO stays near the heartbeat interval (1 s). Stop the
    receiver and the RPO grows instead of reading 0; let it go and the RPO falls back."""
    deployment, endpoints = chain
    vm_id = _disk(chain)[0]
    receiver = next(s.process for s in deployment.services if s.name == "receiver")
    assert receiver is not None
    with httpx.Client(timeout=30.0) as http:
        wait_drained(http, endpoints, vm_id, timeout=240)
        start = _applier_vm(http, endpoints, vm_id)["applied_seq"]
        _wait_for(
            lambda: _applier_vm(http, endpoints, vm_id)["applied_seq"] >= start + 2,
            "heartbeats of the idle VM to be applied",
        )
        # Bounded: a few heartbeat intervals, however loaded the machine is.
        _wait_for(lambda: _applier_vm(http, endpoints, vm_id)["rpo_seconds"] < 5.0, "RPO < 5 s")
        os.kill(receiver.pid, signal.SIGSTOP)
        try:
            # A batch committed just before the stop may still be on its way: the
            # position is read once it has held still for longer than that takes.
            stalled = _settled_applied_seq(http, endpoints, vm_id)
            _wait_for(
                lambda: _applier_vm(http, endpoints, vm_id)["rpo_seconds"] > 6.0,
                "the RPO to grow while the receiver is stopped",
                timeout=60,
            )
            assert _applier_vm(http, endpoints, vm_id)["applied_seq"] == stalled
        finally:
            os.kill(receiver.pid, signal.SIGCONT)
        _wait_for(
            lambda: _applier_vm(http, endpoints, vm_id)["rpo_seconds"] < 5.0,
            "the RPO to fall back once the receiver runs again",
        )


def _settled_applied_seq(
    http: httpx.Client, endpoints: Endpoints, vm_id: str, *, still_s: float = 3.0
) -> int:
    """The applied position once it has not moved for `still_s` seconds."""
    seq = _applier_vm(http, endpoints, vm_id)["applied_seq"]
    since = time.monotonic()
    while time.monotonic() - since < still_s:
        time.sleep(0.2)
        now = _applier_vm(http, endpoints, vm_id)["applied_seq"]
        if now != seq:
            seq, since = now, time.monotonic()
    return int(seq)


def _gaps(http: httpx.Client, endpoints: Endpoints, service: str, vm_id: str) -> float:
    """The receiver's or the applier's count of sequence gaps of the VM (0 before one)."""
    text = http.get(f"{endpoints.services[service]}/metrics").text
    name, labels = {
        "receiver": ("datamover_receiver_sequence_gaps_total", f'vm="{vm_id}"'),
        "applier": ("datamover_applier_gaps_total", f'reason="gap",vm="{vm_id}"'),
    }[service]
    prefix = f"{name}{{{labels}}} "
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


async def _delete_all_records(cluster: KafkaClusterSettings, topic: str) -> int:
    """What retention does to records no one read in time: all of them, gone. The new
    log start offset."""
    partition = TopicPartition(topic, 0)
    async with Consumer(cluster) as consumer:
        end = (await consumer.end_offsets([partition]))[partition]
    async with Admin(cluster) as admin:
        done = await admin.driver.delete_records({partition: RecordsToDelete(end)})
    return int(done[partition])


@pytest.mark.parametrize(
    ("stopped", "stream", "seen_by", "write"),
    [
        ("receiver", Stream.TAP, "receiver", "write -P 0x5a 8M 3M"),
        ("transceiver", Stream.BATCH, "applier", "write -P 0xa5 20M 2M"),
    ],
    ids=["tap-records-lost-before-the-receiver", "batches-lost-before-the-transceiver"],
)
def test_a_hole_in_the_journal_is_repaired_by_a_full_sync_on_its_own(
    chain: tuple[LocalDeployment, Endpoints],
    source_cluster: KafkaClusterSettings,
    stopped: str,
    stream: Stream,
    seen_by: str,
    write: str,
) -> None:
    """Guarantee 3 when the journal itself lost writes (a retention shorter than an outage
    of the receiver, or of the WAN): the service that sees the hole (the receiver; for
    lost batches, only the applier) asks for a resync on a status topic, the applier stops
    at the hole, and the tap answers with a full sync: the target equals the source again,
    with nobody calling the tap."""
    deployment, endpoints = chain
    vm_id, export, source, target = _disk(chain)
    process = next(s.process for s in deployment.services if s.name == stopped)
    assert process is not None
    with httpx.Client(timeout=30.0) as http:
        wait_drained(http, endpoints, vm_id, timeout=240)
        requests_before = replication_positions(http, endpoints, vm_id)[0]["resync_requests"]
        gaps_before = _gaps(http, endpoints, seen_by, vm_id)

        def in_the_topic_that_loses_them() -> bool:
            tap_vm = replication_positions(http, endpoints, vm_id)[0]
            if stream is Stream.TAP:
                return bool(tap_vm["last_seq_acknowledged"] == tap_vm["last_seq_assigned"])
            receiver = http.get(f"{endpoints.services['receiver']}/status").json()
            committed = receiver["vms"][vm_id]["last_committed_seq"] or 0
            return bool(committed >= tap_vm["last_seq_assigned"])

        os.kill(process.pid, signal.SIGSTOP)
        try:
            _run(["qemu-io", "-f", "raw", "-c", write, export])
            _wait_for(in_the_topic_that_loses_them, "the writes in the topic that loses them")
            asyncio.run(_delete_all_records(source_cluster, topic_name(stream, vm_id)))
        finally:
            os.kill(process.pid, signal.SIGCONT)
        _wait_for(
            lambda: (
                replication_positions(http, endpoints, vm_id)[0]["resync_requests"]
                > requests_before
            ),
            f"the tap to act on the {seen_by}'s request",
            timeout=120,
        )
        assert _gaps(http, endpoints, seen_by, vm_id) > gaps_before
    http = _drain_and_pause(chain, vm_id)
    try:
        _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, target])
        assert _applier_vm(http, endpoints, vm_id)["health"] == "ok"
    finally:
        _resume(chain, vm_id, http)
