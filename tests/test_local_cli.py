"""`dmover local up/status/down` runs a whole deployment (both sites, every service) in
the background, serves the protected disk over NBD, and stops everything it started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from dmover.local import read_state


def _dmover(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmover", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_local_up_serves_every_part_and_down_stops_them_all(tmp_path: Path) -> None:
    directory = tmp_path / "local"
    up = _dmover("local", "up", "--dir", str(directory))
    state = read_state(directory)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert state is not None
        assert set(state.services) == {"tap", "receiver", "transceiver", "applier"}
        for name, url in state.services.items():
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200, name
        export = f"{state.nbd}/demo-vm/disk0"
        write = subprocess.run(
            ["qemu-io", "-f", "raw", export, "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert write.returncode == 0 and "Pattern verification failed" not in write.stdout, (
            write.stdout + write.stderr
        )
        status = _dmover("local", "status", "--dir", str(directory))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "tap" in status.stdout and "applier" in status.stdout
        again = _dmover("local", "up", "--dir", str(directory))
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        down = _dmover("local", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stdout + down.stderr
    assert read_state(directory) is None
    assert state is not None
    for name, pid in state.pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) still running after `local down`"
    status = _dmover("local", "status", "--dir", str(directory))
    assert status.returncode == 1
