"""Helpers for the tap tests: plans, a tap in this process or in a child process, real
NBD clients (qemu-io, qemu-img, fio), replaying the tap topic onto empty files, and a
tap topic in memory whose sends can be held (a broker that stopped answering)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from datapath.journal import decode_frame
from datapath.kafka import KafkaClusterSettings
from datapath.localsite import LOG_TAIL_LINES, free_loopback_ports, log_tail
from datapath.protection import (
    Disk,
    Journal,
    ProtectedVM,
    ProtectionPlan,
    Site,
    Sites,
    dump_protection_plan,
)
from datapath.storage import FileBackend
from vib.replay import ReplayResult, replay_frames, replay_tap_topic
from vib.settings import TapSettings
from vib.tap_worker import TapWorker
from vib.vm_tap import Mode, VmTap

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
HELD_BUFFER = MiB  # the buffer of `held_tap`


@dataclass
class DiskSpec:
    name: str
    path: Path
    size: int


def write_plan(
    path: Path, cluster: KafkaClusterSettings, vm_id: str, disks: Sequence[DiskSpec]
) -> Path:
    plan = ProtectionPlan(
        sites=Sites(source=Site(kafka=cluster), target=Site(kafka=cluster)),
        vms=[
            ProtectedVM(
                id=vm_id,
                disks=[
                    Disk(name=d.name, source=str(d.path), target="-", size=d.size) for d in disks
                ],
                journal=Journal(max_message_bytes=8 * MiB),
            )
        ],
    )
    dump_protection_plan(plan, path)
    return path


def tap_settings(root: Path, plan: Path, **overrides: Any) -> TapSettings:
    values: dict[str, Any] = {
        "plan": plan,
        "state_dir": root / "state",
        "nbd_port": 0,
        "http_port": 0,
        "nbd_unix_socket": root / "tap.sock",
        "reconnect_interval_s": 0.5,
        "outage_timeout_s": 5.0,
        "kafka_request_timeout_s": 8.0,
        **overrides,
    }
    return TapSettings(**values)


@contextlib.asynccontextmanager
async def running_tap(settings: TapSettings) -> AsyncIterator[TapWorker]:
    worker = TapWorker(settings)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def nbd_uri(port: int | None, vm_id: str, disk: str) -> str:
    return f"nbd://127.0.0.1:{port}/{vm_id}/{disk}"


async def run(*argv: str | Path, cwd: Path | None = None, limit: float = 240) -> str:
    """Runs a client to completion; its output, or AssertionError with it on failure."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}):\n{text[-3000:]}"
    return text


async def wait_until(
    check: Callable[[], Awaitable[bool] | bool], what: str, limit_s: float = 120.0
) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


def caught_up(status: dict[str, Any]) -> bool:
    """Everything written is in Kafka: live, nothing dirty, no resync, all acknowledged."""
    resync = status["resync"]
    return bool(
        status["mode"] == "live"
        and status["dirty_bytes"] == 0
        and not status["full_sync_pending"]
        and (resync is None or resync["state"] == "complete")
        and status["last_seq_acknowledged"] == status["last_seq_assigned"]
        and status["buffered_bytes"] == 0
    )


async def wait_caught_up(worker: TapWorker, vm_id: str, limit_s: float = 120.0) -> None:
    await wait_until(
        lambda: caught_up(worker.taps[vm_id].status()), f"VM {vm_id} to catch up", limit_s
    )


async def wait_live(worker: TapWorker, vm_id: str, limit_s: float = 120.0) -> None:
    """Publishing (not tracking), so that writes from now on travel as WRITE records."""
    await wait_caught_up(worker, vm_id, limit_s)


async def replay_onto_files(
    cluster: KafkaClusterSettings, vm_id: str, disks: Sequence[DiskSpec], directory: Path
) -> tuple[ReplayResult, list[Path]]:
    """Replays the VM's tap topic onto new empty files; returns them in disk order."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    paths = [directory / f"{d.name}.replay" for d in disks]
    backends = [FileBackend(p, create_size=d.size) for p, d in zip(paths, disks, strict=True)]
    try:
        result = await replay_tap_topic(cluster, vm_id, backends)
    finally:
        for backend in backends:
            backend.close()
    return result, paths


def first_difference(a: Path, b: Path, chunk: int = MiB) -> int | None:
    """The offset of the first byte where two files differ (None when equal)."""
    with a.open("rb") as fa, b.open("rb") as fb:
        offset = 0
        while True:
            x = fa.read(chunk)
            y = fb.read(chunk)
            if x != y:
                for i, (p, q) in enumerate(zip(x, y, strict=False)):
                    if p != q:
                        return offset + i
                return offset + min(len(x), len(y))
            if not x:
                return None
            offset += len(x)


def assert_replay_equals_source(result: ReplayResult, pairs: Sequence[tuple[Path, Path]]) -> None:
    assert result.gapless, f"sequence gaps {result.gaps[:5]}, stale frames {result.stale_frames}"
    assert not result.open_resyncs, f"resync brackets never closed: {result.open_resyncs}"
    for source, replay in pairs:
        diff = first_difference(source, replay)
        assert diff is None, f"{replay.name} differs from {source.name} at byte {diff}"


class TapProcess:
    """The tap as an operator runs it: `python -m vib ...` in a child process."""

    def __init__(self, root: Path, plan: Path, *, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.plan = plan
        self.nbd_port, self.http_port = free_loopback_ports(2)
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = root / "tap.log"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vib",
            "--plan",
            str(self.plan),
            "--port",
            str(self.http_port),
            "--nbd-port",
            str(self.nbd_port),
            "--state-dir",
            str(self.root / "state"),
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        log.close()
        await wait_until(self._ready, "the tap process to be ready", 60)

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"the tap exited early:\n{self.log_tail()}")
        try:
            async with httpx.AsyncClient(base_url=self.http) as client:
                return (await client.get("/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.http, timeout=10) as client:
            response = await client.get("/status")
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data

    async def vm_status(self) -> dict[str, Any]:
        vms: list[dict[str, Any]] = (await self.status())["vms"]
        return vms[0]

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines=lines)


class HeldTopic:
    """A tap topic in memory: frames are kept in order; `hold()` makes sends wait (and so
    the tap's buffer fill) until `release()`."""

    topic = "dm.tap.held"

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._open = asyncio.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def connect(self) -> _HeldSession:
        if not self.frames:
            return _HeldSession(self, 0, 0)
        last = decode_frame(self.frames[-1])
        return _HeldSession(self, last.records[-1].seq, last.epoch)

    def replay_onto(self, target: Path, size: int) -> ReplayResult:
        """Applies the frames received to a new file of `size` bytes, as the target
        site would."""
        with FileBackend(target, create_size=size) as backend:
            return replay_frames([decode_frame(f) for f in self.frames], [backend])


class _HeldSession:
    def __init__(self, topic: HeldTopic, last_seq: int, last_epoch: int) -> None:
        self._topic = topic
        self.last_seq = last_seq
        self.last_epoch = last_epoch

    async def send(self, frame: bytes) -> asyncio.Future[Any]:
        await self._topic._open.wait()
        self._topic.frames.append(bytes(frame))
        acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked

    async def close(self, grace_s: float) -> None:
        pass

    async def abort(self) -> None:
        pass


def source_disk(tmp_path: Path, content: bytes) -> Path:
    """A source disk image in tmp_path holding `content`."""
    path = tmp_path / "source.img"
    path.write_bytes(content)
    return path


@contextlib.asynccontextmanager
async def held_tap(
    tmp_path: Path, source: Path, size: int, topic: HeldTopic, **overrides: Any
) -> AsyncIterator[VmTap]:
    """One VM's tap (one disk, `source`) publishing to `topic`, in this process, with a
    small buffer and frames for the tests that fill it; stopped on exit."""
    vm = ProtectedVM(
        id="vm-held",
        disks=[Disk(name="d0", source=str(source), target="-", size=size)],
        journal=Journal(max_message_bytes=8 * MiB),
    )
    values: dict[str, Any] = {
        "plan": tmp_path / "plan.yaml",
        "state_dir": tmp_path / "state",
        "buffer_max_bytes": HELD_BUFFER,
        "frame_max_bytes": 64 * 1024,
        "resync_chunk_bytes": 64 * 1024,
        "linger_ms": 1,
        "fast_writes": False,
        "heartbeat_interval_s": 0,
        "writeback_interval_s": 0,
        "retire_interval_s": 100,
        "full_sync_on_first_protect": False,
    }
    settings = TapSettings(**(values | overrides))
    tap = VmTap(vm, settings, topic)
    await tap.start()
    try:
        await wait_until(lambda: tap.mode is Mode.LIVE, what="publishing")
        yield tap
    finally:
        await tap.stop(drain_timeout=1)
