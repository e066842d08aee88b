"""Storage backends: every backend keeps the same contract (reads return what was
written, zeroing and trim read as zeros, extents tile the disk, out-of-range requests
are refused by name), and thin disks stay thin (holes really are punched).

Runs against real sparse files, real NBD servers (qemu-nbd with raw and qcow2, nbdkit)
and a real loop device.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import LoopDevices
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datapath.storage import (
    BlockDeviceBackend,
    Extent,
    FileBackend,
    NbdBackend,
    StorageBackend,
    StorageError,
    merge_extents,
    open_backend,
)
from datapath.storage import file as file_module

MiB = 1 << 20
DISK_SIZE = 4 * MiB


def _fs_block_size(path: Path) -> int:
    return os.statvfs(path).f_bsize


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _pattern(length: int, seed: int = 1) -> bytes:
    """Non-zero bytes that differ from one offset to the next."""
    unit = bytes((i * 7 + seed) % 255 + 1 for i in range(251))
    return (unit * (length // len(unit) + 1))[:length]


def _assert_tiles(extents: list[Extent], start: int, end: int) -> None:
    assert extents, "no extents for a non-empty range"
    assert extents[0].offset == start
    assert extents[-1].end == end
    for before, after in itertools.pairwise(extents):
        assert before.end == after.offset, f"gap or overlap between {before} and {after}"
        assert before.zero != after.zero, f"unmerged neighbours {before} and {after}"
    assert all(e.length > 0 for e in extents)


def _assert_zero_extents_read_as_zeros(backend: StorageBackend) -> None:
    for extent in backend.allocated_extents():
        if extent.zero:
            assert backend.read(extent.offset, extent.length) == bytes(extent.length), extent


# --- real NBD servers and loop devices ---------------------------------------------------


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="dmst-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _nbd_server(argv: list[str], sock: Path) -> Iterator[str]:
    """Run an NBD server on a Unix socket until the block ends; yield its URI."""
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed; the NBD backend tests need it")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"{argv[0]} exited with {proc.returncode}: {stderr}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{argv[0]} did not listen on {sock}")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _qemu_nbd(image: Path, sock: Path, fmt: str) -> contextlib.AbstractContextManager[str]:
    # -t: qemu-nbd otherwise exits after its first client. discard=unmap lets trims and
    # zero writes punch holes in the image.
    argv = ["qemu-nbd", "-t", "-f", fmt, "--discard=unmap", "--socket", str(sock), str(image)]
    return _nbd_server(argv, sock)


def _nbdkit(
    sock: Path, *args: str, readonly: bool = False
) -> contextlib.AbstractContextManager[str]:
    argv = ["nbdkit", "-f", "--exit-with-parent", "--unix", str(sock)]
    if readonly:
        argv.append("-r")
    return _nbd_server([*argv, *args], sock)


def _sparse_file(path: Path, size: int = DISK_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def loop_device(loop_devices: LoopDevices) -> tuple[str, Path]:
    """A loop device over a sparse file of DISK_SIZE: (device path, backing file)."""
    return loop_devices(DISK_SIZE)


# nbdkit-4k: a server that refuses requests not aligned to 4 KiB (its minimum block size).
BACKEND_KINDS = ["file", "qemu-nbd-raw", "qemu-nbd-qcow2", "nbdkit-file", "nbdkit-4k", "loop"]


@pytest.fixture(params=BACKEND_KINDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, socket_dir: Path
) -> Iterator[StorageBackend]:
    """A fresh, all-zero DISK_SIZE disk of each kind."""
    kind: str = request.param
    sock = socket_dir / "nbd.sock"
    if kind == "file":
        with FileBackend(tmp_path / "disk.img", create_size=DISK_SIZE) as b:
            yield b
    elif kind == "qemu-nbd-raw":
        with (
            _qemu_nbd(_sparse_file(tmp_path / "disk.img"), sock, "raw") as uri,
            NbdBackend(uri) as b,
        ):
            yield b
    elif kind == "qemu-nbd-qcow2":
        image = tmp_path / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(DISK_SIZE)], check=True
        )
        with _qemu_nbd(image, sock, "qcow2") as uri, NbdBackend(uri) as b:
            yield b
    elif kind == "nbdkit-file":
        image = _sparse_file(tmp_path / "disk.img")
        with _nbdkit(sock, "file", f"file={image}") as uri, NbdBackend(uri) as b:
            yield b
    elif kind == "nbdkit-4k":
        image = _sparse_file(tmp_path / "disk.img")
        serve = _nbdkit(
            sock,
            "--filter=blocksize-policy",
            "file",
            f"file={image}",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-error-policy=error",
        )
        with serve as uri, NbdBackend(uri) as b:
            yield b
    else:
        device, _ = request.getfixturevalue("loop_device")
        with BlockDeviceBackend(device) as b:
            yield b


# --- the contract, on every backend --------------------------------------------------


def test_size_is_the_disk_size(backend: StorageBackend) -> None:
    assert backend.size == DISK_SIZE


def test_read_returns_what_was_written_at_any_alignment(backend: StorageBackend) -> None:
    writes = [
        (0, _pattern(4096, 1)),
        (5000, _pattern(70001, 2)),
        (DISK_SIZE - 777, _pattern(777, 3)),
    ]
    for offset, data in writes:
        backend.write(offset, data)
    backend.flush()
    for offset, data in writes:
        assert backend.read(offset, len(data)) == data
        # readinto fills a slice of a larger buffer and touches nothing around it.
        buf = bytearray(b"\xee" * (len(data) + 20))
        backend.readinto(offset, memoryview(buf)[10 : 10 + len(data)])
        assert buf[10 : 10 + len(data)] == data
        assert buf[:10] == b"\xee" * 10 and buf[-10:] == b"\xee" * 10
    assert backend.read(4096, 904) == bytes(904)


def test_write_takes_any_memoryview_by_its_byte_length(backend: StorageBackend) -> None:
    words = array.array("I", range(1000))
    backend.write(12345, memoryview(words))
    assert backend.read(12345, 4000) == words.tobytes()


def test_zeroed_and_trimmed_ranges_read_as_zeros(backend: StorageBackend) -> None:
    model = bytearray(_pattern(DISK_SIZE))
    backend.write(0, model)
    for offset, length, op in [
        (5000, 70001, "hole"),  # unaligned both ends
        (MiB, 64 * 1024, "nohole"),
        (MiB + 300_001, 4095, "nohole"),
        (2 * MiB - 1, 513 * 1024, "trim"),
        (DISK_SIZE - 100, 100, "trim"),
        (3 * MiB, 1, "hole"),
    ]:
        if op == "trim":
            backend.trim(offset, length)
        else:
            backend.write_zeroes(offset, length, punch_hole=op == "hole")
        model[offset : offset + length] = bytes(length)
    backend.flush()
    assert backend.read(0, DISK_SIZE) == model


def test_extents_tile_the_disk_and_zero_extents_read_as_zeros(backend: StorageBackend) -> None:
    backend.write(MiB + 100, _pattern(10_000))
    backend.write(3 * MiB, _pattern(MiB))
    backend.trim(3 * MiB + 128 * 1024, 256 * 1024)
    extents = list(backend.allocated_extents())
    _assert_tiles(extents, 0, DISK_SIZE)
    _assert_zero_extents_read_as_zeros(backend)
    # Written bytes lie in data extents only.
    for offset, length in [(MiB + 100, 10_000), (3 * MiB, 128 * 1024)]:
        covering = [e for e in extents if e.offset < offset + length and e.end > offset]
        assert covering and not any(e.zero for e in covering), (offset, covering)
    # A sub-range is tiled exactly, starting and ending mid-extent.
    sub = list(backend.allocated_extents(MiB + 50, 2 * MiB + 3))
    _assert_tiles(sub, MiB + 50, 3 * MiB + 53)


def test_out_of_range_requests_are_refused_by_name(backend: StorageBackend) -> None:
    size = backend.size
    calls: list[tuple[str, Callable[[], object]]] = [
        ("read", lambda: backend.read(size, 1)),
        ("read", lambda: backend.read(-1, 10)),
        ("read", lambda: backend.readinto(size - 2, memoryview(bytearray(3)))),
        ("write", lambda: backend.write(size - 1, b"ab")),
        ("write_zeroes", lambda: backend.write_zeroes(0, size + 1)),
        ("trim", lambda: backend.trim(size, 1)),
        ("allocated_extents", lambda: list(backend.allocated_extents(0, size + 1))),
    ]
    for operation, call in calls:
        with pytest.raises(StorageError) as caught:
            call()
        assert caught.value.operation == operation
        assert backend.name in str(caught.value) and operation in str(caught.value)
        assert "outside the disk" in str(caught.value)
    # Nothing was written by the refused requests.
    assert backend.read(size - 4, 4) == bytes(4)


def test_closed_backend_refuses_io(backend: StorageBackend) -> None:
    backend.close()
    with pytest.raises(StorageError, match="closed"):
        backend.read(0, 1)
    with pytest.raises(StorageError, match="closed"):
        backend.flush()
    backend.close()  # closing twice is harmless


def test_merged_extents_alternate_and_keep_every_byte() -> None:
    runs = [
        Extent(0, 10, False),
        Extent(10, 0, True),
        Extent(10, 5, False),
        Extent(15, 5, True),
        Extent(20, 1, True),
        Extent(21, 4, False),
    ]
    assert list(merge_extents(runs)) == [
        Extent(0, 15, False),
        Extent(15, 6, True),
        Extent(21, 4, False),
    ]
    assert list(merge_extents([])) == []


# --- sparse files ---------------------------------------------------------------------


def test_create_size_makes_a_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    with FileBackend(path, create_size=64 * MiB) as disk:
        assert disk.size == 64 * MiB
        assert disk.allocated_bytes() == 0
        assert list(disk.allocated_extents()) == [Extent(0, 64 * MiB, True)]
    assert os.stat(path).st_size == 64 * MiB and _allocated(path) == 0


def test_existing_file_is_grown_but_never_truncated(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(_pattern(8192))
    with FileBackend(path, create_size=16384) as disk:
        assert disk.size == 16384
        assert disk.read(0, 8192) == _pattern(8192)
        assert disk.read(8192, 8192) == bytes(8192)
    with pytest.raises(StorageError, match="larger than the requested 4096"):
        FileBackend(path, create_size=4096)
    assert path.read_bytes()[:8192] == _pattern(8192)


def test_missing_file_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.img"
    with pytest.raises(StorageError) as caught:
        FileBackend(path)
    assert str(path) in str(caught.value) and caught.value.operation == "open"
    assert caught.value.errno == errno.ENOENT
    assert isinstance(caught.value, OSError)


def test_readonly_file_refuses_every_write(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(_pattern(8192))
    with FileBackend(path, readonly=True) as disk:
        calls: list[Callable[[], None]] = [
            lambda: disk.write(0, b"x"),
            lambda: disk.write_zeroes(0, 10),
            lambda: disk.trim(0, 4096),
        ]
        for call in calls:
            with pytest.raises(StorageError, match="read-only"):
                call()
        assert disk.read(0, 8192) == _pattern(8192)


def test_write_allocates_and_trim_punches_holes(tmp_path: Path) -> None:
    block = _fs_block_size(tmp_path)
    path = tmp_path / "disk.img"
    with FileBackend(path, create_size=DISK_SIZE) as disk:
        disk.write(MiB, _pattern(MiB))
        disk.flush()
        assert disk.allocated_bytes() >= MiB
        assert list(disk.allocated_extents()) == [
            Extent(0, MiB, True),
            Extent(MiB, MiB, False),
            Extent(2 * MiB, 2 * MiB, True),
        ]
        before = _allocated(path)
        disk.trim(MiB + block, MiB - 2 * block)
        assert _allocated(path) == before - (MiB - 2 * block)
        assert list(disk.allocated_extents(MiB, MiB)) == [
            Extent(MiB, block, False),
            Extent(MiB + block, MiB - 2 * block, True),
            Extent(2 * MiB - block, block, False),
        ]
        disk.write_zeroes(MiB, MiB)  # punch_hole=True by default
        assert disk.allocated_bytes() == 0
        assert list(disk.allocated_extents()) == [Extent(0, DISK_SIZE, True)]


def test_unaligned_trim_zeroes_partial_blocks_and_frees_whole_ones(tmp_path: Path) -> None:
    block = _fs_block_size(tmp_path)
    with FileBackend(tmp_path / "disk.img", create_size=DISK_SIZE) as disk:
        data = _pattern(3 * block)
        disk.write(0, data)
        disk.trim(100, 3 * block - 200)
        assert disk.read(0, 3 * block) == data[:100] + bytes(3 * block - 200) + data[-100:]
        assert disk.allocated_bytes() == 2 * block  # the middle block is gone
        assert [e.zero for e in disk.allocated_extents(0, 3 * block)] == [False, True, False]


def test_zeroes_without_hole_stay_allocated(tmp_path: Path) -> None:
    with FileBackend(tmp_path / "disk.img", create_size=DISK_SIZE) as disk:
        disk.write(0, _pattern(MiB))
        disk.write_zeroes(0, MiB, punch_hole=False)
        assert disk.read(0, MiB) == bytes(MiB)
        assert disk.allocated_bytes() >= MiB
        _assert_zero_extents_read_as_zeros(disk)


def test_zeroing_falls_back_to_writing_zeros_when_the_file_system_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(file_module, "fallocate", refuse)
    with FileBackend(tmp_path / "disk.img", create_size=DISK_SIZE) as disk:
        disk.write(0, _pattern(DISK_SIZE))
        disk.trim(10, 3 * MiB + 5)  # several 1 MiB chunks of zeros
        disk.write_zeroes(3 * MiB + 100, 1000, punch_hole=False)
        disk.write_zeroes(3 * MiB + 5000, 1000)
        expected = bytearray(_pattern(DISK_SIZE))
        for offset, length in [(10, 3 * MiB + 5), (3 * MiB + 100, 1000), (3 * MiB + 5000, 1000)]:
            expected[offset : offset + length] = bytes(length)
        assert disk.read(0, DISK_SIZE) == expected
    # Each refused mode is tried once, then skipped.
    assert len(calls) == 2


_SMALL_DISK = 200_003  # not a multiple of any block size


@st.composite
def _operations(draw: st.DrawFn) -> list[tuple[str, int, int, bytes]]:
    ops = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["write", "write", "zero_hole", "zero_nohole", "trim"]))
        # Bias offsets towards block boundaries, where the off-by-one errors live.
        offset = draw(
            st.one_of(
                st.integers(0, _SMALL_DISK),
                st.integers(0, _SMALL_DISK // 4096).map(lambda b: b * 4096),
            )
        )
        length = draw(st.integers(0, min(_SMALL_DISK - offset, 40_000)))
        data = draw(st.binary(min_size=length, max_size=length)) if kind == "write" else b""
        ops.append((kind, offset, length, data))
    return ops


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=_operations())
def test_file_backend_matches_a_bytearray_model(
    tmp_path: Path, ops: list[tuple[str, int, int, bytes]]
) -> None:
    path = tmp_path / "model.img"
    path.unlink(missing_ok=True)
    model = bytearray(_SMALL_DISK)
    with FileBackend(path, create_size=_SMALL_DISK) as disk:
        for kind, offset, length, data in ops:
            if kind == "write":
                disk.write(offset, data)
                model[offset : offset + length] = data
            else:
                if kind == "trim":
                    disk.trim(offset, length)
                else:
                    disk.write_zeroes(offset, length, punch_hole=kind == "zero_hole")
                model[offset : offset + length] = bytes(length)
            extents = list(disk.allocated_extents())
            _assert_tiles(extents, 0, _SMALL_DISK)
            for extent in extents:
                if extent.zero:
                    assert model[extent.offset : extent.end] == bytes(extent.length)
        assert disk.read(0, _SMALL_DISK) == model
        view = memoryview(bytearray(_SMALL_DISK))
        disk.readinto(0, view)
        assert view == model


# --- NBD --------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit"])
def test_nbd_trim_punches_holes_in_the_exported_file(
    server: str, tmp_path: Path, socket_dir: Path
) -> None:
    image = _sparse_file(tmp_path / "disk.img")
    sock = socket_dir / "nbd.sock"
    serve = (
        _qemu_nbd(image, sock, "raw")
        if server == "qemu-nbd"
        else _nbdkit(sock, "file", f"file={image}")
    )
    with serve as uri, NbdBackend(uri) as disk:
        disk.write(0, _pattern(2 * MiB))
        disk.flush()
        assert _allocated(image) >= 2 * MiB
        assert list(disk.allocated_extents()) == [
            Extent(0, 2 * MiB, False),
            Extent(2 * MiB, 2 * MiB, True),
        ]
        disk.trim(0, MiB)
        disk.write_zeroes(MiB, MiB)
        disk.flush()
        assert _allocated(image) == 0
        assert disk.allocated_bytes() == 0
        assert list(disk.allocated_extents()) == [Extent(0, DISK_SIZE, True)]
        assert disk.read(0, 2 * MiB) == bytes(2 * MiB)


def test_qcow2_extents_follow_its_clusters(tmp_path: Path, socket_dir: Path) -> None:
    image = tmp_path / "disk.qcow2"
    cluster = 64 * 1024
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"cluster_size={cluster}",
            str(image),
            str(DISK_SIZE),
        ],
        check=True,
    )
    with _qemu_nbd(image, socket_dir / "nbd.sock", "qcow2") as uri, NbdBackend(uri) as disk:
        assert list(disk.allocated_extents()) == [Extent(0, DISK_SIZE, True)]
        assert disk.allocated_bytes() == 0
        disk.write(MiB + 100, _pattern(4096))  # inside one cluster
        assert list(disk.allocated_extents()) == [
            Extent(0, MiB, True),
            Extent(MiB, cluster, False),
            Extent(MiB + cluster, DISK_SIZE - MiB - cluster, True),
        ]
        assert disk.allocated_bytes() == cluster
        disk.write(2 * MiB - 10, _pattern(20))  # straddles two clusters
        assert [e for e in disk.allocated_extents() if not e.zero][1] == Extent(
            2 * MiB - cluster, 2 * cluster, False
        )
        disk.trim(0, DISK_SIZE)
        assert list(disk.allocated_extents()) == [Extent(0, DISK_SIZE, True)]
        assert disk.allocated_bytes() == 0
        assert disk.read(MiB, cluster) == bytes(cluster)
    check = subprocess.run(
        ["qemu-img", "check", str(image)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_nbd_extents_follow_the_zero_flag_not_the_hole_flag(
    tmp_path: Path, socket_dir: Path
) -> None:
    # A hole that does not read as zeros (e.g. backed by another image) is data for a
    # copy; allocated zeros are zeros that occupy space.
    extent_list = tmp_path / "extents.txt"
    extent_list.write_text("0 1M\n1M 1M zero\n2M 512K hole\n2560K 1536K hole,zero\n")
    serve = _nbdkit(
        socket_dir / "nbd.sock",
        "--filter=extentlist",
        "null",
        f"size={DISK_SIZE}",
        f"extentlist={extent_list}",
        readonly=True,
    )
    with serve as uri, NbdBackend(uri) as disk:
        assert list(disk.allocated_extents()) == [
            Extent(0, MiB, False),
            Extent(MiB, MiB, True),
            Extent(2 * MiB, MiB // 2, False),
            Extent(2 * MiB + MiB // 2, 3 * MiB // 2, True),
        ]
        assert list(disk.allocated_extents(MiB - 1, 3 * MiB // 2 + 2)) == [
            Extent(MiB - 1, 1, False),
            Extent(MiB, MiB, True),
            Extent(2 * MiB, MiB // 2, False),
            Extent(2 * MiB + MiB // 2, 1, True),
        ]
        assert disk.allocated_bytes() == 2 * MiB


def test_one_nbd_handle_serves_many_threads(tmp_path: Path, socket_dir: Path) -> None:
    image = _sparse_file(tmp_path / "disk.img")
    region = 256 * 1024

    def worker(disk: StorageBackend, index: int) -> None:
        base = index * region
        buf = bytearray(region)
        for round_ in range(20):
            data = _pattern(region, seed=index * 31 + round_)
            disk.write(base, data)
            disk.readinto(base, memoryview(buf))
            assert buf == data
            assert disk.read(base, 4096) == data[:4096]
            list(disk.allocated_extents(base, region))

    serve = _nbdkit(socket_dir / "nbd.sock", "file", f"file={image}")
    with serve as uri, NbdBackend(uri) as disk, ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(worker, disk, i) for i in range(4)]:
            future.result(timeout=60)


def test_requests_larger_than_the_server_maximum_are_split(
    tmp_path: Path, socket_dir: Path
) -> None:
    image = _sparse_file(tmp_path / "disk.img")
    with (
        _nbdkit(
            socket_dir / "nbd.sock",
            "--filter=blocksize-policy",
            "file",
            f"file={image}",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ) as uri,
        NbdBackend(uri) as disk,
    ):
        data = _pattern(MiB + 3)
        disk.write(1, data)
        assert disk.read(1, len(data)) == data
        buf = bytearray(len(data))
        disk.readinto(1, memoryview(buf))
        assert buf == data
    assert image.read_bytes()[1 : 1 + len(data)] == data


def test_server_without_write_zeroes_gets_zeros_written(tmp_path: Path, socket_dir: Path) -> None:
    image = _sparse_file(tmp_path / "disk.img")
    with (
        _nbdkit(
            socket_dir / "nbd.sock", "--filter=nozero", "file", f"file={image}", "zeromode=none"
        ) as uri,
        NbdBackend(uri) as disk,
    ):
        assert not disk.can_zero
        disk.write(0, _pattern(3 * MiB))
        disk.write_zeroes(10, 2 * MiB)
        disk.trim(2 * MiB + 20, 1000)
        disk.write_zeroes(2 * MiB + 5000, 100, punch_hole=False)
        expected = bytearray(_pattern(3 * MiB))
        for offset, length in [(10, 2 * MiB), (2 * MiB + 20, 1000), (2 * MiB + 5000, 100)]:
            expected[offset : offset + length] = bytes(length)
        assert disk.read(0, 3 * MiB) == expected


def test_server_without_block_status_reports_all_data(tmp_path: Path, socket_dir: Path) -> None:
    image = _sparse_file(tmp_path / "disk.img")
    serve = _nbdkit(socket_dir / "nbd.sock", "--filter=noextents", "file", f"file={image}")
    with serve as uri, NbdBackend(uri) as disk:
        assert list(disk.allocated_extents()) == [Extent(0, DISK_SIZE, False)]
        assert list(disk.allocated_extents(5, 10)) == [Extent(5, 10, False)]
        assert disk.allocated_bytes() == DISK_SIZE


def test_nbd_write_error_is_a_storage_error_naming_the_uri(
    tmp_path: Path, socket_dir: Path
) -> None:
    image = _sparse_file(tmp_path / "disk.img")
    with (
        _nbdkit(
            socket_dir / "nbd.sock",
            "--filter=error",
            "file",
            f"file={image}",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
        ) as uri,
        NbdBackend(uri) as disk,
    ):
        with pytest.raises(StorageError) as caught:
            disk.write(4096, b"x" * 512)
        assert uri in str(caught.value) and caught.value.operation == "write"
        assert caught.value.errno == errno.EIO
        assert disk.read(4096, 512) == bytes(512)  # the connection still works


def test_nbd_flush_reaches_the_server(tmp_path: Path, socket_dir: Path) -> None:
    image = _sparse_file(tmp_path / "disk.img")
    log = tmp_path / "nbdkit.log"
    with (
        _nbdkit(
            socket_dir / "nbd.sock", "--filter=log", "file", f"file={image}", f"logfile={log}"
        ) as uri,
        NbdBackend(uri) as disk,
    ):
        disk.write(0, b"x")
        assert "Flush" not in log.read_text()
        disk.flush()
        assert "Flush" in log.read_text()


def test_read_only_export_refuses_writes(tmp_path: Path, socket_dir: Path) -> None:
    image = _sparse_file(tmp_path / "disk.img")
    serve = _nbdkit(socket_dir / "nbd.sock", "file", f"file={image}", readonly=True)
    with serve as uri, NbdBackend(uri) as disk:
        assert disk.readonly
        with pytest.raises(StorageError, match="read-only"):
            disk.write(0, b"x")
        assert disk.read(0, 1) == b"\0"


def test_unreachable_nbd_uri_is_named_in_the_error(socket_dir: Path) -> None:
    uri = f"nbd+unix:///?socket={socket_dir / 'nobody.sock'}"
    with pytest.raises(StorageError) as caught:
        NbdBackend(uri)
    assert uri in str(caught.value) and caught.value.operation == "open"


# --- block devices ------------------------------------------------------------------------


def test_block_device_reports_its_size_and_one_data_extent(loop_device: tuple[str, Path]) -> None:
    device, _ = loop_device
    with BlockDeviceBackend(device) as disk:
        assert disk.size == DISK_SIZE
        assert list(disk.allocated_extents()) == [Extent(0, DISK_SIZE, False)]
        assert list(disk.allocated_extents(100, 50)) == [Extent(100, 50, False)]
        assert disk.allocated_bytes() == DISK_SIZE


def test_block_device_trim_unmaps_and_reads_zeros(loop_device: tuple[str, Path]) -> None:
    device, backing = loop_device
    with BlockDeviceBackend(device) as disk:
        disk.write(0, _pattern(2 * MiB))
        disk.flush()
        assert _allocated(backing) >= 2 * MiB
        disk.trim(0, MiB)
        disk.write_zeroes(MiB, MiB - 1)  # the ragged last byte is written, not unmapped
        disk.flush()
        assert _allocated(backing) <= 4096
        assert disk.read(0, 2 * MiB) == bytes(2 * MiB - 1) + _pattern(2 * MiB)[-1:]


def test_block_device_discard_frees_aligned_ranges_only(loop_device: tuple[str, Path]) -> None:
    device, backing = loop_device
    with BlockDeviceBackend(device) as disk:
        disk.write(0, _pattern(MiB))
        disk.flush()
        with pytest.raises(StorageError, match="not aligned"):
            disk.discard(1, 512)
        disk.discard(0, MiB)
        assert _allocated(backing) == 0


def test_block_device_rejects_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a block device"):
        BlockDeviceBackend(_sparse_file(tmp_path / "disk.img"))


# --- open_backend -------------------------------------------------------------------------


def test_open_backend_picks_the_backend_from_the_spec(
    tmp_path: Path, socket_dir: Path, loop_device: tuple[str, Path]
) -> None:
    path = tmp_path / "new.img"
    with open_backend(str(path), create_size=MiB) as disk:
        assert isinstance(disk, FileBackend) and disk.size == MiB
    with open_backend(f"file://{path}") as disk:
        assert isinstance(disk, FileBackend) and disk.size == MiB
    device, _ = loop_device
    with open_backend(device) as disk:
        assert isinstance(disk, BlockDeviceBackend)
    with pytest.raises(StorageError, match="smaller than the required"):
        open_backend(device, create_size=DISK_SIZE + 1)
    with _nbdkit(socket_dir / "nbd.sock", "file", f"file={path}") as uri:
        with open_backend(uri) as disk:
            assert isinstance(disk, NbdBackend) and disk.size == MiB
        with pytest.raises(StorageError, match="smaller than the required"):
            open_backend(uri, create_size=2 * MiB)


def test_a_larger_existing_file_is_refused_with_one_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(8192))
    with pytest.raises(StorageError) as caught:
        FileBackend(path, create_size=4096)
    message = str(caught.value)
    assert "larger than the requested 4096" in message
    assert message.count(str(path)) == 1 and caught.value.operation == "open"
