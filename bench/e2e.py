"""End-to-end figures with every part on this machine (issue: applier, RPO).

Prints one JSON line:
- protected throughput: data copied into the tap with nbdcopy, measured until the
  target has applied all of it (lag drained), beside nbdcopy of the same data to a
  local file in the same run (the baseline). Goal >= 150 MB/s.
- RPO p50/p99 at a steady 20 MB/s of random 64 KiB writes (fio, nbd engine), measured
  end to end from outside: every 20 ms the tap's last assigned sequence number and the
  applier's applied one are read; the RPO of a sample is the age of the oldest write the
  tap had numbered and the target had not applied (from when the tap first reported it,
  so the figure errs high by up to one sampling period, never low). Beside it, the
  applier's own RPO gauge (an upper bound: the age of the newest applied record when
  nothing read is waiting). Goal p99 < 250 ms.
`--quick` finishes in about a minute.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from dmover.local import LocalDeployment, wait_drained


def make_data(path: Path, size: int) -> None:
    """Half-compressible data: each 64 KiB block is half random, half zeros."""
    block = 64 * 1024
    with path.open("wb") as out:
        for _ in range(size // block):
            out.write(os.urandom(block // 2) + bytes(block // 2))


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - start


def end_to_end_rpo(samples: list[tuple[float, int, float, int]]) -> list[float]:
    """RPO of each (tap time, tap last seq, applier time, applied seq) sample, in seconds.

    The oldest unapplied write of a sample is applied + 1; it was numbered after the last
    tap reading below it, so its age is at most the applier's reading time minus that
    reading's time. When the tap had not yet numbered it, nothing known was missing."""
    rpos: list[float] = []
    first_seen: list[tuple[int, float]] = []  # (tap seq, time of the reading before it)
    previous_time = samples[0][0] if samples else 0.0
    for tap_time, tap_seq, applier_time, applied in samples:
        if not first_seen or tap_seq > first_seen[-1][0]:
            first_seen.append((tap_seq, previous_time))
        previous_time = tap_time
        wanted = applied + 1
        index = bisect.bisect_left(first_seen, wanted, key=lambda entry: entry[0])
        if index == len(first_seen):
            rpos.append(0.0)  # the tap had numbered nothing the target lacks
        else:
            rpos.append(max(0.0, applier_time - first_seen[index][1]))
    return rpos


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
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the services (e.g. DM_RECEIVER_BATCH_INTERVAL_S=0.05)",
    )
    args = parser.parse_args()
    data_size = (256 if args.quick else 1024) * 2**20
    rpo_seconds = 15 if args.quick else 60
    disk_size = data_size + 256 * 2**20
    with tempfile.TemporaryDirectory(prefix="dm-bench-e2e-") as tmp:
        root = Path(tmp)
        data = root / "data.img"
        make_data(data, data_size)
        baseline = timed(["nbdcopy", str(data), str(root / "copy.img")])

        env = dict(item.split("=", 1) for item in args.env)
        deployment = LocalDeployment(root / "local", disk_size=disk_size, vm_id="bench", env=env)
        endpoints = deployment.start()
        try:
            export = f"{endpoints.nbd}/bench/disk0"
            http = httpx.Client(timeout=10.0)
            wait_drained(http, endpoints, "bench", timeout=300)
            written = protected = float("nan")
            if not args.rpo_only:
                start = time.monotonic()
                subprocess.run(["nbdcopy", str(data), export], check=True, capture_output=True)
                written = time.monotonic() - start
                wait_drained(http, endpoints, "bench", timeout=600)
                protected = time.monotonic() - start

            gauge: list[float] = []
            positions: list[tuple[float, int, float, int]] = []
            done = threading.Event()
            tap_url, applier_url = endpoints.services["tap"], endpoints.services["applier"]

            def sample() -> None:
                while not done.is_set():
                    tap_vm = http.get(f"{tap_url}/status").json()["vms"][0]
                    tap_time = time.monotonic()
                    applier_vm = http.get(f"{applier_url}/status").json()["vms"]["bench"]
                    applier_time = time.monotonic()
                    positions.append(
                        (
                            tap_time,
                            int(tap_vm["last_seq_assigned"]),
                            applier_time,
                            int(applier_vm["applied_seq"]),
                        )
                    )
                    gauge.append(float(applier_vm["rpo_seconds"]))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
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
                    f"--runtime={rpo_seconds}",
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
            sampler.join()
            http.close()
        finally:
            deployment.stop()
    # The first samples precede fio's first write; the tail after it is drained anyway.
    rpos = end_to_end_rpo(positions)
    mb = data_size / 1e6
    result = {
        "bench": "e2e",
        "data_mb": round(mb, 1),
        "protected_mb_s": None if args.rpo_only else round(mb / protected, 1),
        "tap_ingest_mb_s": None if args.rpo_only else round(mb / written, 1),
        "baseline_nbdcopy_local_mb_s": round(mb / baseline, 1),
        "protected_vs_baseline": None if args.rpo_only else round(baseline / protected, 3),
        "goal_protected_mb_s": 150,
        "rpo_at_20mb_s_p50_ms": round(percentile(rpos, 0.5) * 1000, 1),
        "rpo_at_20mb_s_p99_ms": round(percentile(rpos, 0.99) * 1000, 1),
        "rpo_samples": len(rpos),
        "applier_gauge_rpo_p50_ms": round(percentile(gauge, 0.5) * 1000, 1),
        "applier_gauge_rpo_p99_ms": round(percentile(gauge, 0.99) * 1000, 1),
        "goal_rpo_p99_ms": 250,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
