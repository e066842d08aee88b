"""Linux system calls the file and block device backends share: exact positional I/O on
a file descriptor, fallocate(2) with the flags Python's os module does not offer, and
making a directory entry durable."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from collections.abc import Callable

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Errors meaning "this file system or device cannot do that", not "the call failed".
UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    func = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    fallocate_fn: Callable[[int, int, int, int], int] = func
    return fallocate_fn


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError with the errno on failure."""
    while True:
        if _libc_fallocate()(fd, mode, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def pread_exact(fd: int, offset: int, buf: memoryview) -> None:
    """Fill buf from offset; EOFError if the file ends first (it shrank under us)."""
    done = 0
    total = len(buf)
    while done < total:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise EOFError(f"end of file at {offset + done}, {total - done} bytes short")
        done += got


def pread_bytes(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    # Short read (signal, or a file that shrank): finish in a buffer of our own.
    buf = bytearray(length)
    view = memoryview(buf)
    view[: len(data)] = data
    pread_exact(fd, offset + len(data), view[len(data) :])
    return bytes(buf)


def pwrite_all(fd: int, offset: int, view: memoryview) -> None:
    done = 0
    total = len(view)
    while done < total:
        done += os.pwrite(fd, view[done:], offset + done)


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Makes the entries of directory `path` durable: a file created (or renamed) in it
    survives a power loss only once its directory is flushed too."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
