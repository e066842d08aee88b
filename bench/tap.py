"""Tap overhead: fio through the tap (replicating to a local source site) against
`nbdkit file` on an identical file, measured in the same run, workload by workload
(best of 3 rounds; 1 with --quick).

Prints one JSON line:
- 4 KiB random writes, queue depth 16: IOPS (goal >= 0.5x nbdkit);
- 1 MiB sequential writes: MB/s (goal >= 0.8x nbdkit);
- 4 KiB writes at queue depth 1: latency p50/p99 in microseconds;
with the ratios tap/nbdkit, what the tap published (frames, the last sequence number,
sessions lost, buffer overflows in all and per workload: a workload that overflows was
partly tracked in the dirty bitmap rather than published, so its figure is partly that
of a tap that does not replicate until it resyncs), and what writing fresh page-cache
pages costs on this machine (`bench/machine.py`).

    .venv/bin/python bench/tap.py [--quick] [--bootstrap HOST:PORT] [--keep DIR]

Without --bootstrap a private single-node Kafka site is started for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from machine import page_cache_cost  # noqa: E402

from datapath.kafka import KafkaClusterSettings  # noqa: E402
from datapath.localsite import KafkaSite, free_loopback_ports  # noqa: E402
from datapath.protection import (  # noqa: E402
    Disk,
    ProtectedVM,
    ProtectionPlan,
    Site,
    Sites,
    dump_protection_plan,
)

MiB = 1024 * 1024


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def fio(uri: str, *, rw: str, bs: str, iodepth: int, runtime: int, size: int) -> dict[str, Any]:
    """One fio run over NBD; its JSON report of the writes."""
    argv = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime}",
        "--ramp_time=1",
        "--output-format=json",
    ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    job: dict[str, Any] = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    return job


WORKLOADS: dict[str, dict[str, Any]] = {
    "randwrite_4k_qd16": {"rw": "randwrite", "bs": "4k", "iodepth": 16},
    "seqwrite_1m": {"rw": "write", "bs": "1M", "iodepth": 4},
    "qd1_4k": {"rw": "randwrite", "bs": "4k", "iodepth": 1},
}


def summarize(name: str, job: dict[str, Any]) -> dict[str, float]:
    if name == "randwrite_4k_qd16":
        return {"randwrite_4k_qd16_iops": round(job["iops"])}
    if name == "seqwrite_1m":
        return {"seqwrite_1m_mbps": round(job["bw_bytes"] / 1e6, 1)}
    percentiles = job["clat_ns"]["percentile"]
    return {
        "qd1_4k_p50_us": round(percentiles["50.000000"] / 1000, 1),
        "qd1_4k_p99_us": round(percentiles["99.000000"] / 1000, 1),
    }


def measure_both(
    targets: dict[str, str],
    runtime: int,
    size: int,
    rounds: int,
    settle: Callable[[], dict[str, Any]],
    overflows: dict[str, int],
) -> dict[str, dict[str, float]]:
    """Each workload on each target in turn, `rounds` times; the best round of each.

    Interleaving keeps both targets under the same background load (the machine may be
    shared); `settle` runs before every run, nbdkit's included, so that each starts with
    the tap caught up with Kafka: no resync or drain left over from the run before
    shares the cores with it."""
    best: dict[str, dict[str, float]] = {target: {} for target in targets}
    for _ in range(rounds):
        for name, workload in WORKLOADS.items():
            for target, uri in targets.items():
                before = settle()["overflows"]
                job = fio(uri, runtime=runtime, size=size, **workload)
                if target == "tap":
                    after = settle()["overflows"]
                    overflows[name] = overflows.get(name, 0) + after - before
                for key, value in summarize(name, job).items():
                    lower_is_better = key.endswith("_us")
                    current = best[target].get(key)
                    if (
                        current is None
                        or (lower_is_better and value < current)
                        or (not lower_is_better and value > current)
                    ):
                        best[target][key] = value
    return best


@contextlib.contextmanager
def nbdkit_file(path: Path) -> Iterator[str]:
    port = free_loopback_ports(1)[0]
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-p", str(port), "file", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"nbd://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def tap_process(root: Path, bootstrap: str, vm_id: str, disk: Path, size: int) -> Iterator[Any]:
    cluster = KafkaClusterSettings(bootstrap_servers=bootstrap, client_id="bench-tap")
    plan = ProtectionPlan(
        sites=Sites(source=Site(kafka=cluster), target=Site(kafka=cluster)),
        vms=[
            ProtectedVM(id=vm_id, disks=[Disk(name="d0", source=str(disk), target="-", size=size)])
        ],
    )
    plan_path = root / "plan.yaml"
    dump_protection_plan(plan, plan_path)
    nbd_port, http_port = free_loopback_ports(2)
    log = (root / "tap.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vib",
            "--plan",
            str(plan_path),
            "--port",
            str(http_port),
            "--nbd-port",
            str(nbd_port),
            "--state-dir",
            str(root / "state"),
            "--log-level",
            "WARNING",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(nbd_port)
        client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}")
        wait_for_mode(client, "live")
        yield f"nbd://127.0.0.1:{nbd_port}/{vm_id}/d0", client, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def wait_for_mode(client: httpx.Client, mode: str, timeout: float = 300.0) -> dict[str, Any]:
    """Waits until the VM is in `mode` with everything acknowledged and nothing dirty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            vm: dict[str, Any] = client.get("/status").json()["vms"][0]
            if (
                vm["mode"] == mode
                and vm["last_seq_acknowledged"] == vm["last_seq_assigned"]
                and vm["dirty_bytes"] == 0
            ):
                return vm
        time.sleep(0.2)
    raise RuntimeError(f"the tap did not reach mode {mode} within {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    parser.add_argument("--bootstrap", help="an existing source Kafka cluster")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument("--profile", action="store_true", help="py-spy the tap meanwhile")
    args = parser.parse_args()
    runtime = 4 if args.quick else 10
    rounds = 1 if args.quick else 3
    size = 256 * MiB if args.quick else 1024 * MiB
    root = args.keep or Path(tempfile.mkdtemp(prefix="dm-bench-tap-"))
    root.mkdir(parents=True, exist_ok=True)
    machine = page_cache_cost(root)
    site = None
    try:
        bootstrap = args.bootstrap
        if bootstrap is None:
            site = KafkaSite.start("source", root / "kafka")
            bootstrap = site.bootstrap
        base_file = root / "nbdkit.img"
        tap_file = root / "tap.img"
        for path in (base_file, tap_file):
            with path.open("wb") as f:
                f.truncate(size)
        vm_id = f"bench-{os.getpid()}"
        with (
            nbdkit_file(base_file) as base_uri,
            tap_process(root, bootstrap, vm_id, tap_file, size) as (uri, client, pid),
        ):
            profiler = None
            if args.profile:
                profiler = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "-p",
                        str(pid),
                        "-o",
                        str(root / "profile.txt"),
                        "--format",
                        "raw",
                        "-d",
                        str(3 * rounds * (runtime + 1)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            overflows: dict[str, int] = {}
            results = measure_both(
                {"nbdkit_file": base_uri, "tap": uri},
                runtime,
                size,
                rounds,
                lambda: wait_for_mode(client, "live"),
                overflows,
            )
            if profiler is not None:
                profiler.wait()
            status = wait_for_mode(client, "live")
            metrics = client.get("/metrics").text
        tap, baseline = results["tap"], results["nbdkit_file"]
        frames = _metric(metrics, "datamover_tap_frames_published_total")
        result = {
            "bench": "tap",
            "quick": args.quick,
            "rounds": rounds,
            "tap": tap,
            "nbdkit_file": baseline,
            "ratios": {
                "randwrite_4k_qd16_iops": round(
                    tap["randwrite_4k_qd16_iops"] / baseline["randwrite_4k_qd16_iops"], 2
                ),
                "seqwrite_1m_mbps": round(
                    tap["seqwrite_1m_mbps"] / baseline["seqwrite_1m_mbps"], 2
                ),
                "qd1_4k_p50_us": round(tap["qd1_4k_p50_us"] / baseline["qd1_4k_p50_us"], 2),
                "qd1_4k_p99_us": round(tap["qd1_4k_p99_us"] / baseline["qd1_4k_p99_us"], 2),
            },
            "goals": {"randwrite_4k_qd16_iops": 0.5, "seqwrite_1m_mbps": 0.8},
            "published": {
                "frames": frames,
                "last_seq": status["last_seq_acknowledged"],
                "outages": status["outages"],
                "overflows": status["overflows"],
                "overflows_by_workload": overflows,
                # Writes that took the C write path (vib/_fast_writes.c).
                "fast_writes": status["fast_writes"],
                # Writes that waited for an activity log transaction (fdatasync).
                "activity_log_commits": _metric(
                    metrics, "datamover_tap_activity_log_commits_total"
                ),
            },
        }
        result["machine"] = machine
        print(json.dumps(result))
    finally:
        if site is not None:
            site.stop()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


if __name__ == "__main__":
    main()
