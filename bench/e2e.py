"""End-to-end figures with every part on this machine (issue: applier, RPO).

Prints one JSON line:
- protected throughput: data copied into the tap with nbdcopy, measured until the
  target has applied all of it (lag drained), beside nbdcopy of the same data to a
  local file in the same run (the baseline). Goal >= 150 MB/s.
- RPO p50/p99 at a steady 20 MB/s of random 64 KiB writes (fio, nbd engine), sampled
  from the applier's /status every 50 ms. Goal p99 < 250 ms.
`--quick` finishes in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from dmover.local import LocalDeployment, replication_positions, wait_drained


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


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    data_size = (256 if args.quick else 1024) * 2**20
    rpo_seconds = 15 if args.quick else 60
    disk_size = data_size + 256 * 2**20
    with tempfile.TemporaryDirectory(prefix="dm-bench-e2e-") as tmp:
        root = Path(tmp)
        data = root / "data.img"
        make_data(data, data_size)
        baseline = timed(["nbdcopy", str(data), str(root / "copy.img")])

        deployment = LocalDeployment(root / "local", disk_size=disk_size, vm_id="bench")
        endpoints = deployment.start()
        try:
            export = f"{endpoints.nbd}/bench/disk0"
            http = httpx.Client(timeout=10.0)
            wait_drained(http, endpoints, "bench", timeout=300)
            start = time.monotonic()
            subprocess.run(["nbdcopy", str(data), export], check=True, capture_output=True)
            written = time.monotonic() - start
            wait_drained(http, endpoints, "bench", timeout=600)
            protected = time.monotonic() - start

            samples: list[float] = []
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    _, applier_vm = replication_positions(http, endpoints, "bench")
                    samples.append(float(applier_vm["rpo_seconds"]))
                    time.sleep(0.05)

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
    mb = data_size / 1e6
    result = {
        "bench": "e2e",
        "data_mb": round(mb, 1),
        "protected_mb_s": round(mb / protected, 1),
        "tap_ingest_mb_s": round(mb / written, 1),
        "baseline_nbdcopy_local_mb_s": round(mb / baseline, 1),
        "protected_vs_baseline": round(baseline / protected, 3),
        "goal_protected_mb_s": 150,
        "rpo_at_20mb_s_p50_ms": round(percentile(samples, 0.5) * 1000, 1),
        "rpo_at_20mb_s_p99_ms": round(percentile(samples, 0.99) * 1000, 1),
        "rpo_samples": len(samples),
        "goal_rpo_p99_ms": 250,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
