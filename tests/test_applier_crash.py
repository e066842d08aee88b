"""Crash consistency of the applier: SIGKILLed again and again while a stream of batches
(and resync brackets) arrives, the target always holds a prefix of the source's writes
whenever the applier says it is paused, and equals the source once drained."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from test_applier_support import JournalWriter, SourceVm, file_targets

from datapath.integrity import consistent_prefixes, holds_prefix
from datapath.kafka import KafkaClusterSettings
from datapath.localsite import REPO_ROOT, free_loopback_ports
from services.applier.state import StateStore

MIB = 1024 * 1024
KILLS = 20


class ApplierProcess:
    """`python -m services.applier` as an operator would run it."""

    def __init__(self, plan: Path, state_dir: Path, log_path: Path) -> None:
        self.plan = plan
        self.state_dir = state_dir
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.port = free_loopback_ports(1)[0]
        env = {
            **os.environ,
            "DM_APPLIER_FETCH_TIMEOUT_S": "0.2",
            "DM_APPLIER_END_OFFSET_INTERVAL_S": "0.2",
            "DM_APPLIER_MAX_UNIT_BYTES": str(1 * MIB),
            "DM_APPLIER_RESTART_BACKOFF_S": "0.2",
        }
        argv = [
            sys.executable,
            "-m",
            "services.applier",
            "--plan",
            str(self.plan),
            "--state-dir",
            str(self.state_dir),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    async def start(self, client: httpx.AsyncClient) -> None:
        self.process = self._spawn()
        for _ in range(600):
            assert self.process.poll() is None, f"applier exited; see {self.log_path}"
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(f"{self.url}/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"applier not ready; see {self.log_path}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def intent_on_disk(state_dir: Path, vm_id: str) -> bool:
    return StateStore(state_dir).load(vm_id).intent is not None


async def produce(
    writer: JournalWriter,
    vm: SourceVm,
    stop: asyncio.Event,
    rng: random.Random,
    brackets: list[tuple[int, int]],
) -> int:
    """Bursts of batches, now and then a resync bracket (its seq range added to
    `brackets`), until told to stop."""
    bursts = 0
    resync_id = 0
    while not stop.is_set():
        bursts += 1
        if bursts % 6 == 0:
            resync_id += 1
            batches = [vm.batch(vm.ops(6), resync_id=resync_id, starts=True)]
            batches += [vm.batch(vm.ops(6), resync_id=resync_id) for _ in range(2)]
            batches.append(vm.batch(vm.ops(6), resync_id=resync_id, completes=True))
            brackets.append((batches[0].first_seq, batches[-1].last_seq))
            # A bracket spans transactions, as a long resync does.
            await writer.send(*batches[:2])
            await asyncio.sleep(0.1)
            await writer.send(*batches[2:])
        else:
            await writer.send(*[vm.batch(vm.ops(8)) for _ in range(rng.randint(2, 6))])
        await asyncio.sleep(rng.uniform(0.1, 0.5))
    return bursts


async def check_paused_target(
    client: httpx.AsyncClient,
    applier: ApplierProcess,
    vm: SourceVm,
    disks: list[Path],
    brackets: list[tuple[int, int]],
) -> int:
    """Pause over HTTP; the target must hold exactly the prefix the applier reports, and
    that prefix must not end inside a resync bracket (guarantee 4: a bracket is applied
    whole; its records are ordinary writes here, so a prefix check alone would pass)."""
    response = await client.post(f"{applier.url}/vms/{vm.vm_id}/pause")
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()
    assert status["paused"] and not status["dirty"]
    seq = status["applied_seq"]
    ranges = await asyncio.to_thread(consistent_prefixes, vm.log, disks)
    assert holds_prefix(ranges, seq), f"target holds prefixes {ranges}, applier says {seq}"
    inside = [(first, last) for first, last in brackets if first <= seq < last]
    assert not inside, f"applied seq {seq} ends inside the resync bracket {inside}"
    assert (await client.post(f"{applier.url}/vms/{vm.vm_id}/resume")).status_code == 200
    return int(seq)


async def test_sigkilled_applier_keeps_the_target_a_prefix_of_the_source(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    sizes = [4 * MIB, 4 * MIB]
    disks, plan = await file_targets(tmp_path, source_cluster, target_cluster, vm_id, sizes)
    state_dir = tmp_path / "state"
    vm = SourceVm(vm_id, sizes, seed=99, max_blocks=8)
    rng = random.Random(2024)
    applier = ApplierProcess(plan, state_dir, tmp_path / "applier.log")
    stop = asyncio.Event()
    killed_mid_unit = 0
    checked: list[int] = []
    brackets: list[tuple[int, int]] = []
    async with (
        httpx.AsyncClient(timeout=60) as client,
        JournalWriter(target_cluster, vm_id, max_message_bytes=32 * 1024) as writer,
    ):
        producer = asyncio.create_task(produce(writer, vm, stop, rng, brackets))
        try:
            for round_ in range(KILLS):
                await applier.start(client)
                if round_ % 2 == 0:
                    await asyncio.sleep(rng.uniform(0.05, 0.4))
                    checked.append(await check_paused_target(client, applier, vm, disks, brackets))
                    await asyncio.sleep(rng.uniform(0.0, 0.4))
                else:
                    # Aim at the middle of a unit: kill as soon as an intent is durable.
                    for _ in range(1500):
                        if intent_on_disk(state_dir, vm_id):
                            break
                        await asyncio.sleep(0.002)
                applier.kill()
                killed_mid_unit += intent_on_disk(state_dir, vm_id)
            stop.set()
            await producer
            await applier.start(client)
            for _ in range(1200):
                status = (await client.get(f"{applier.url}/vms/{vm_id}")).json()
                if status["applied_seq"] == vm.last_seq:
                    break
                await asyncio.sleep(0.05)
            unknown = await client.post(f"{applier.url}/vms/no-such-vm/pause")
            assert unknown.status_code == 404 and "no-such-vm" in unknown.json()["detail"]
            final = await check_paused_target(client, applier, vm, disks, brackets)
            assert final == vm.last_seq
            metrics = (await client.get(f"{applier.url}/metrics")).text
            newest_ts = (await client.get(f"{applier.url}/vms/{vm_id}")).json()["source_ts_ns"]
        finally:
            stop.set()
            applier.terminate()
            if not producer.done():
                producer.cancel()
    assert [d.read_bytes() for d in disks] == [bytes(m) for m in vm.model]
    assert checked == sorted(checked) and len(checked) == KILLS // 2
    # The kills did land in the middle of units, and each was redone on restart.
    assert killed_mid_unit >= 1
    assert brackets, "no resync bracket was produced"
    # Drained: the RPO gauge is the age of the newest applied write (an upper bound).
    gauge = next(
        line
        for line in metrics.splitlines()
        if line.startswith(f'datamover_rpo_seconds{{vm="{vm_id}"}}')
    )
    assert 0 < float(gauge.split()[-1]) <= (time.time_ns() - newest_ts) / 1e9
