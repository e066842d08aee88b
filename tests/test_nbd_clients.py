"""Real NBD clients (qemu-io, qemu-img, nbdcopy, nbdinfo, fio) read and write our server
correctly, over TCP and a Unix socket, one connection or several at once.

The server runs in-process on the test's event loop; each client is a subprocess
awaited with asyncio, so the loop keeps serving while the client runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from datapath.storage import FileBackend
from vib.nbd import NbdServer, StorageExport

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("qemu-io", "qemu-img", "nbdcopy", "nbdinfo", "fio")),
    reason="NBD client tools are not installed",
)


async def run(*argv: str | Path, cwd: Path | None = None, limit: float = 180) -> str:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}: {err.decode()}"
    return out.decode()


def _data_runs(image: bytearray, block: int = 4096) -> list[tuple[int, int]]:
    """[start, end) runs of blocks that are not all zero."""
    zero = bytes(block)
    runs: list[tuple[int, int]] = []
    for start in range(0, len(image), block):
        if image[start : start + block] != zero:
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + block)
            else:
                runs.append((start, start + block))
    return runs


class Served:
    """An export of a sparse file, served over TCP (and a Unix socket on request)."""

    def __init__(self, server: NbdServer, port: int, backend: FileBackend, name: str) -> None:
        self.server = server
        self.port = port
        self.backend = backend
        self.name = name

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.name}"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    backend = FileBackend(tmp_path / "export.img", create_size=64 * MiB)
    server = NbdServer({"disk": StorageExport("disk", backend, description="test disk")})
    port = await server.serve_tcp("127.0.0.1", 0)
    yield Served(server, port, backend, "disk")
    await server.close()
    backend.close()


async def test_qemu_io_patterns_read_back_and_land_on_disk(served: Served) -> None:
    commands = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -P 0x11 513 1000",  # unaligned
        "read -P 0x11 513 1000",
        "aio_write -P 0x22 1M 128k",
        "aio_write -P 0x33 2M 128k",
        "aio_flush",
        "read -P 0x22 1M 128k",
        "read -P 0x33 2M 128k",
        "write -z 4M 1M",
        "read -P 0 4M 1M",
        "discard 8M 64k",
        "write -f -P 0x44 60M 4k",  # FUA
        "flush",
    ]
    argv = ["qemu-io", "-f", "raw", served.uri]
    for command in commands:
        argv += ["-c", command]
    out = await run(*argv)
    assert "fail" not in out.lower(), out
    disk = served.backend
    assert disk.read(0, 513) == b"\xab" * 513
    assert disk.read(513, 1000) == b"\x11" * 1000
    assert disk.read(1513, 65536 - 1513) == b"\xab" * (65536 - 1513)
    assert disk.read(1 * MiB, 128 * 1024) == b"\x22" * 128 * 1024
    assert disk.read(60 * MiB, 4096) == b"\x44" * 4096


async def test_qemu_io_detects_a_wrong_pattern(served: Served) -> None:
    # The pattern checks above only mean something if a mismatch is visible.
    proc = await asyncio.create_subprocess_exec(
        "qemu-io",
        "-f",
        "raw",
        served.uri,
        "-c",
        "write -P 0x01 0 4k",
        "-c",
        "read -P 0x02 0 4k",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert b"Pattern verification failed" in out


async def test_qemu_img_convert_of_an_ext4_image_compares_equal(
    served: Served, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    rng = random.Random(7)
    for i in range(20):
        (tree / f"file{i}.bin").write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
    (tree / "sub" / "notes.txt").write_text("replicated by datamover\n" * 100)
    image = tmp_path / "fs.img"
    await run("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, image, "32M")
    # The export is bigger than the image; convert and compare the image-sized head.
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, served.uri)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", image, served.uri)
    head = served.backend.read(0, 32 * MiB)
    assert head == image.read_bytes()
    copy = tmp_path / "copy.img"
    copy.write_bytes(head)
    await run("e2fsck", "-fn", copy)


async def test_nbdcopy_both_ways_preserves_content_and_sparseness(
    served: Served, tmp_path: Path
) -> None:
    source = tmp_path / "source.img"
    rng = random.Random(11)
    image = bytearray(64 * MiB)
    for _ in range(40):
        start = rng.randrange(0, 64 * MiB - 256 * 1024) & ~4095
        chunk = rng.randbytes(rng.randrange(4096, 256 * 1024))
        image[start : start + len(chunk)] = chunk
    source_backend = FileBackend(source, create_size=64 * MiB)
    for extent in _data_runs(image):
        source_backend.write(extent[0], image[extent[0] : extent[1]])
    source_backend.close()
    await run("nbdcopy", source, served.uri)
    back = tmp_path / "back.img"
    await run("nbdcopy", served.uri, back)
    assert back.read_bytes() == source.read_bytes()
    # Holes of the source stay holes on the export (nbdcopy zeroes them by trimming).
    assert served.backend.allocated_bytes() < 40 * 256 * 1024 + 40 * 4096 * 4


async def test_nbdinfo_map_shows_holes_on_a_sparse_disk(served: Served) -> None:
    served.backend.write(4 * MiB, b"\x01" * MiB)
    out = await run("nbdinfo", "--map", "--json", served.uri)
    extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    assert extents == [
        (0, 4 * MiB, 3),
        (4 * MiB, MiB, 0),
        (5 * MiB, 59 * MiB, 3),
    ]


async def test_nbdinfo_lists_every_export(tmp_path: Path) -> None:
    backends = [FileBackend(tmp_path / f"d{i}.img", create_size=MiB) for i in range(3)]
    exports = {
        f"vm-{i}": StorageExport(f"vm-{i}", b, description=f"disk {i}")
        for i, b in enumerate(backends)
    }
    server = NbdServer(exports)
    port = await server.serve_tcp("127.0.0.1", 0)
    try:
        out = await run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}")
    finally:
        await server.close()
        for backend in backends:
            backend.close()
    listed = {e["export-name"]: e.get("description") for e in json.loads(out)["exports"]}
    assert listed == {"vm-0": "disk 0", "vm-1": "disk 1", "vm-2": "disk 2"}


async def test_fio_random_writes_verify_over_four_connections(
    served: Served, tmp_path: Path
) -> None:
    common = [
        "fio",
        "--name=tap",
        "--ioengine=nbd",
        f"--uri={served.uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=4",
        "--size=12M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--group_reporting",
        "--output-format=json",
    ]
    most_connections = 0

    async def watch_connections() -> None:
        nonlocal most_connections
        while True:
            most_connections = max(most_connections, served.server.connection_count)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch_connections())
    try:
        out = await run(*common, cwd=tmp_path, limit=300)
    finally:
        watcher.cancel()
    # Four connections were open at once: the multi-conn path was really used.
    assert most_connections >= 4
    report = json.loads(out[out.index("{") :])
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 4 * 12 * MiB
    out = await run(*common, "--verify_only", cwd=tmp_path, limit=300)
    report = json.loads(out[out.index("{") :])
    assert report["jobs"][0]["error"] == 0
    assert report["jobs"][0]["read"]["io_bytes"] == 4 * 12 * MiB
    assert (served.server.metrics.registry.get_sample_value("nbd_connections_total") or 0) >= 8
    # Each job wrote only its own 16 MiB slice.
    assert served.backend.read(12 * MiB, 4 * MiB) == bytes(4 * MiB)


async def test_unix_socket_export_serves_qemu_io_and_nbdinfo(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "u.img", create_size=16 * MiB)
    server = NbdServer({"udisk": StorageExport("udisk", backend)})
    socket_path = tmp_path / "nbd.sock"
    await server.serve_unix(str(socket_path))
    uri = f"nbd+unix:///udisk?socket={socket_path}"
    try:
        out = await run(
            "qemu-io",
            "-f",
            "raw",
            uri,
            "-c",
            "write -P 0x5c 1M 256k",
            "-c",
            "read -P 0x5c 1M 256k",
        )
        assert "fail" not in out.lower()
        size = await run("nbdinfo", "--size", uri)
        assert int(size) == 16 * MiB
    finally:
        await server.close()
    assert not socket_path.exists()  # removed on close
    assert backend.read(1 * MiB, 256 * 1024) == b"\x5c" * 256 * 1024
    backend.close()
