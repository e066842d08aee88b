"""End-to-end figures with every part on this machine (issue: applier, RPO).

Prints one JSON line:
- protected throughput: data copied into the tap with nbdcopy, measured until the
  target has applied all of it (lag drained), beside nbdcopy of the same data to a
  local file in the same run (the baseline). Goal >= 150 MB/s. Beside it, when each
  stage had passed on the last write (`throughput_stages_done_s`, seconds from the
  start: the guest's writes, the tap's publishing, the receiver's batches, the
  transceiver's copy, the applier), sampled from the services' `/status` every 200 ms,
  and how often the tap fell back to its dirty bitmap meanwhile (`throughput_tap_overflows`:
  its buffer full, so what the guest wrote until it drained travelled in a resync, which
  the applier applies whole once complete; `throughput_tap_outages`: sessions that
  ended): the stage that finishes long after the one before it limits the run.
  And the CPU each part used meanwhile per MB of guest data (`throughput_cpu_ms_per_mb`,
  from `/proc`: the brokers, the services, `other` for the rest of the machine, the
  kernel's write-back threads among it, and `machine` for all of it): 2 cores give 2000
  ms per second, so `machine` bounds the throughput on this machine at 2000 / machine MB/s.
- RPO p50/p99 at a steady 20 MB/s of random 64 KiB writes (fio, nbd engine), measured
  end to end: every 10 ms the applier's applied sequence number is read (from its state
  file, where the applier makes it durable: polling its HTTP API 100 times a second took
  15-20 % of a core, bench and applier together, from the parts being measured);
  afterwards the VM's tap topic is read back for each record's timestamp (stamped by the
  tap when the guest's write completed), and the RPO of a sample is the age of the
  oldest write the target lacked (record applied + 1), 0 when the tap had not numbered
  it yet. Beside it, the applier's own RPO gauge (an upper bound: the age of the newest
  applied record when nothing read is waiting), read from its HTTP API every 100 ms.
  Goal p99 < 250 ms. As fio's `--ramp_time`, the samples of the first `--ramp-s`
  seconds (2) are left out of these figures: the parts settle after the throughput run
  (or warm up, with `--rpo-only`) and the goal is for the steady state.
  `rpo_including_ramp_p99_ms` gives the p99 with them. The setup's writes and the
  throughput run's are synced to disk before the RPO run, so that their write-back
  (which the kernel starts 30 s after a write) does not land in it.
Beside them, `machine`: what writing fresh page-cache pages costs on this machine at the
start of the run (`bench/machine.py`), which decides much of the figures above.
`--quick` finishes in about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from machine import page_cache_cost

from datapath.kafka import KafkaClusterSettings
from datapath.protection import load_protection_plan
from dmover.local import Endpoints, LocalDeployment, replication_positions, wait_drained
from services.applier.state import StateStore
from vib.replay import read_tap_frames

# How often the applier's RPO gauge is read (over HTTP: each read costs both processes CPU).
GAUGE_PERIOD_S = 0.1
# How often each service's progress is sampled during the throughput run.
STAGE_PERIOD_S = 0.2
STAGES = ("tap_published", "receiver", "transceiver", "applier")


def stage_positions(http: httpx.Client, endpoints: Endpoints, vm_id: str) -> dict[str, int]:
    """The last sequence number each stage has passed on (-1: none yet)."""

    def status_of(service: str) -> dict[str, Any]:
        response = http.get(f"{endpoints.services[service]}/status")
        response.raise_for_status()
        vm: dict[str, Any] = response.json()["vms"].get(vm_id, {})
        return vm

    tap_vm, applier_vm = replication_positions(http, endpoints, vm_id)
    seqs = {
        "tap_published": tap_vm["last_seq_acknowledged"],
        "receiver": status_of("receiver").get("last_committed_seq"),
        "transceiver": status_of("transceiver").get("last_seq"),
        "applier": applier_vm["applied_seq"],
    }
    return {stage: -1 if seq is None else int(seq) for stage, seq in seqs.items()}


class StageTimeline:
    """Samples every stage's progress in a thread until stopped."""

    def __init__(self, endpoints: Endpoints, vm_id: str) -> None:
        self.endpoints, self.vm_id = endpoints, vm_id
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._done = threading.Event()
        self._error: httpx.HTTPError | None = None
        self._thread = threading.Thread(target=self._run)
        self._start = time.monotonic()

    def __enter__(self) -> StageTimeline:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._done.set()
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise RuntimeError(f"sampling the stages failed: {self._error}") from self._error

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as http:
            while not self._done.is_set():
                try:
                    positions = stage_positions(http, self.endpoints, self.vm_id)
                except httpx.HTTPError as exc:
                    self._error = exc
                    return
                self.samples.append((time.monotonic() - self._start, positions))
                self._done.wait(STAGE_PERIOD_S)

    def done_at(self, last_seq: int, end_s: float) -> dict[str, float]:
        """When each stage first held `last_seq` (`end_s` if no sample saw it before)."""
        return {
            stage: round(next((t for t, seen in self.samples if seen[stage] >= last_seq), end_s), 1)
            for stage in STAGES
        }


# /proc reports CPU time in clock ticks.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process (all its threads) so far, with those of
    its children: the ones it waited for, and the ones alive now (the tap's producer
    process, say), whose time would otherwise land in `other`."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0  # gone meanwhile
    own = sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS
    return own + sum(process_cpu_s(child) for child in children(pid))


def children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(child) for task in tasks for child in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []


def machine_busy_s() -> tuple[float, float]:
    """CPU seconds all cores spent on anything but idle and I/O wait so far, and the
    seconds the host ran something else on them (steal: not ours, reported apart)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


class CpuAccount:
    """CPU used by each part (and by the rest of the machine) between start and stop."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self.used_s: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        busy, steal = machine_busy_s()
        return {
            "machine": busy,
            "steal": steal,
            **{name: process_cpu_s(pid) for name, pid in self.pids.items()},
        }

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> None:
        end = self._read()
        self.used_s = {name: end[name] - self._start[name] for name in end}

    def ms_per_mb(self, mb: float) -> dict[str, float]:
        """Per MB of guest data: each part, `other` (the kernel's threads, nbdcopy, this
        benchmark), `machine`, the sum of all, and `steal`, the time the host gave the
        machine's cores to something else (not in `machine`)."""
        parts = {
            name: used for name, used in self.used_s.items() if name not in ("machine", "steal")
        }
        per_mb = {name: round(used * 1000 / mb, 2) for name, used in parts.items()}
        per_mb["other"] = round((self.used_s["machine"] - sum(parts.values())) * 1000 / mb, 2)
        per_mb["machine"] = round(self.used_s["machine"] * 1000 / mb, 2)
        per_mb["steal"] = round(self.used_s["steal"] * 1000 / mb, 2)
        return per_mb


def make_data(path: Path, size: int) -> None:
    """Half-compressible data: each 4 KiB block is 2 KiB random, 2 KiB zeros. No 4 KiB
    block is all zeros, so nbdcopy (which turns such blocks into zero requests) writes
    every byte as data: halves of 32 KiB made it send half of the data as zeros, which
    cost the chain next to nothing and flattered the MB/s and the CPU per MB."""
    block = 4096
    chunk = 256
    with path.open("wb") as out:
        for _ in range(size // (block * chunk)):
            randoms = os.urandom(block // 2 * chunk)
            out.write(
                b"".join(
                    randoms[i * block // 2 : (i + 1) * block // 2] + bytes(block // 2)
                    for i in range(chunk)
                )
            )


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - start


def end_to_end_rpo(samples: list[tuple[int, int]], write_ts: dict[int, int]) -> list[float]:
    """RPO of each (wall time ns, applied seq) sample of the applier, in seconds.

    The oldest write the target lacks is the record numbered applied + 1; the tap stamped
    it (`ts_ns`) when the guest's write completed. Its age at the sample is the RPO; when
    the tap had not numbered it yet, the target lacked nothing."""
    rpos = []
    for sampled_ns, applied in samples:
        ts = write_ts.get(applied + 1)
        rpos.append(0.0 if ts is None or ts > sampled_ns else (sampled_ns - ts) / 1e9)
    return rpos


def record_timestamps(cluster: KafkaClusterSettings, vm_id: str) -> dict[int, int]:
    """Every record's sequence number and timestamp, read back from the VM's tap topic."""
    frames = asyncio.run(read_tap_frames(cluster, vm_id, timeout_s=300))
    return {record.seq: record.ts_ns for frame in frames for record in frame.records}


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rpo-only", action="store_true", help="skip the throughput run")
    parser.add_argument(
        "--ramp-s",
        type=int,
        default=2,
        help="seconds of the steady workload left out of the RPO figures (as fio's ramp_time)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the services (e.g. DM_RECEIVER_BATCH_INTERVAL_S=0.05)",
    )
    args = parser.parse_args()
    rpo_seconds = 15 if args.quick else 60
    if args.ramp_s < 0:
        parser.error("--ramp-s must not be negative")
    data_size = (256 if args.quick else 1024) * 2**20
    disk_size = data_size + 256 * 2**20
    with tempfile.TemporaryDirectory(prefix="dm-bench-e2e-") as tmp:
        root = Path(tmp)
        machine = page_cache_cost(root)
        data = root / "data.img"
        make_data(data, data_size)
        baseline = timed(["nbdcopy", str(data), str(root / "copy.img")])
        # The setup's own writes (the data and the baseline's copy) must not be written
        # back in the middle of the measurement: the kernel does it 30 s after they were
        # made, and fsyncs then stall behind them (measured: a 570 ms apply).
        (root / "copy.img").unlink()
        os.sync()

        env = dict(item.split("=", 1) for item in args.env)
        deployment = LocalDeployment(root / "local", disk_size=disk_size, vm_id="bench", env=env)
        endpoints = deployment.start()
        try:
            export = f"{endpoints.nbd}/bench/disk0"
            http = httpx.Client(timeout=10.0)
            wait_drained(http, endpoints, "bench", timeout=300)
            written = protected = float("nan")
            stages: dict[str, float] = {}
            outages = overflows = 0
            cpu = CpuAccount(
                {name: pid for name, pid in endpoints.pids.items() if name != "supervisor"}
            )
            if not args.rpo_only:
                tap_before = replication_positions(http, endpoints, "bench")[0]
                with StageTimeline(endpoints, "bench") as timeline:
                    cpu.start()
                    start = time.monotonic()
                    subprocess.run(["nbdcopy", str(data), export], check=True, capture_output=True)
                    written = time.monotonic() - start
                    tap_vm, _ = wait_drained(http, endpoints, "bench", timeout=600)
                    protected = time.monotonic() - start
                    cpu.stop()
                last_seq = tap_vm["last_seq_acknowledged"]
                stages = {
                    "guest_writes": round(written, 1),
                    **timeline.done_at(last_seq, round(protected, 1)),
                }
                tap_after = replication_positions(http, endpoints, "bench")[0]
                outages = tap_after["outages"] - tap_before["outages"]
                overflows = tap_after["overflows"] - tap_before["overflows"]
                # Likewise the throughput run's writes (Kafka logs, disks): a steady
                # 20 MB/s does not leave a gigabyte to write back at once.
                os.sync()

            gauge: list[tuple[int, float]] = []
            positions: list[tuple[int, int]] = []
            done = threading.Event()
            applier_url = endpoints.services["applier"]
            store = StateStore(deployment.applier_state_dir)

            def sample() -> None:
                while not done.is_set():
                    # A save in progress tears at most one slot: load() reads the other.
                    applied = store.load("bench").applied_seq
                    # Taken after the read: the RPO errs high by the read's time.
                    positions.append((time.time_ns(), -1 if applied is None else applied))
                    time.sleep(0.01)

            def sample_gauge() -> None:
                # Apart from the positions: a slow answer must not thin out their samples.
                with httpx.Client(timeout=10.0) as gauge_http:
                    while not done.wait(GAUGE_PERIOD_S):
                        applier_vm = gauge_http.get(f"{applier_url}/vms/bench").json()
                        gauge.append((time.time_ns(), float(applier_vm["rpo_seconds"])))

            rpo_tap_before = replication_positions(http, endpoints, "bench")[0]
            steady_from_ns = time.time_ns() + args.ramp_s * 1_000_000_000
            samplers = [threading.Thread(target=sample), threading.Thread(target=sample_gauge)]
            for sampler in samplers:
                sampler.start()
            host_port = endpoints.nbd.removeprefix("nbd://")
            subprocess.run(
                [
                    "fio",
                    "--name=rpo",
                    "--ioengine=nbd",
                    f"--uri=nbd://{host_port}/bench/disk0",
                    "--rw=randwrite",
                    "--bs=64k",
                    "--rate=20m",
                    "--iodepth=4",
                    f"--runtime={rpo_seconds + args.ramp_s}",
                    "--time_based",
                    f"--size={data_size}",
                    "--randrepeat=0",
                    "--buffer_compress_percentage=50",
                ],
                check=True,
                capture_output=True,
                cwd=root,
            )
            done.set()
            for sampler in samplers:
                sampler.join()
            rpo_tap_after = replication_positions(http, endpoints, "bench")[0]
            http.close()
            source = load_protection_plan(endpoints.plan).sites.source.kafka
            write_ts = record_timestamps(source, "bench")
        finally:
            deployment.stop()
    all_rpos = end_to_end_rpo(positions, write_ts)
    steady = [i for i, (sampled_ns, _) in enumerate(positions) if sampled_ns >= steady_from_ns]
    rpos = [all_rpos[i] for i in steady]
    gauge_rpos = [value for sampled_ns, value in gauge if sampled_ns >= steady_from_ns]
    if not rpos:
        raise SystemExit("no RPO sample after the ramp: nothing to report")
    mb = data_size / 1e6
    result = {
        "bench": "e2e",
        "data_mb": round(mb, 1),
        "protected_mb_s": None if args.rpo_only else round(mb / protected, 1),
        "tap_ingest_mb_s": None if args.rpo_only else round(mb / written, 1),
        "baseline_nbdcopy_local_mb_s": round(mb / baseline, 1),
        "protected_vs_baseline": None if args.rpo_only else round(baseline / protected, 3),
        "goal_protected_mb_s": 150,
        "throughput_stages_done_s": None if args.rpo_only else stages,
        "throughput_tap_outages": None if args.rpo_only else outages,
        "throughput_tap_overflows": None if args.rpo_only else overflows,
        "throughput_cpu_ms_per_mb": None if args.rpo_only else cpu.ms_per_mb(mb),
        "rpo_at_20mb_s_p50_ms": round(percentile(rpos, 0.5) * 1000, 1),
        "rpo_at_20mb_s_p99_ms": round(percentile(rpos, 0.99) * 1000, 1),
        "rpo_samples": len(rpos),
        "rpo_ramp_s": args.ramp_s,
        "rpo_including_ramp_p99_ms": round(percentile(all_rpos, 0.99) * 1000, 1),
        "applier_gauge_rpo_p50_ms": round(percentile(gauge_rpos, 0.5) * 1000, 1),
        "applier_gauge_rpo_p99_ms": round(percentile(gauge_rpos, 0.99) * 1000, 1),
        "goal_rpo_p99_ms": 250,
        # Writes the tap only tracked (an overflow, an outage) get their numbers, and so
        # their timestamps, later: the figures above would under-count. 0 and 0 here, or
        # the run says nothing about the RPO.
        "rpo_tap_overflows": rpo_tap_after["overflows"] - rpo_tap_before["overflows"],
        "rpo_tap_outages": rpo_tap_after["outages"] - rpo_tap_before["outages"],
        "machine": machine,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
