"""What the file and block device backends share: positional I/O on one descriptor."""

from __future__ import annotations

import errno
import os

from datapath.storage.backend import StorageBackend, StorageError
from datapath.storage.linux import pread_bytes, pread_exact, pwrite_all


class FdBackend(StorageBackend):
    """A disk reached through one file descriptor opened by the subclass. pread/pwrite
    never touch the descriptor's file position, so threads may share it."""

    _fd: int

    def fileno(self) -> int:
        return self._fd

    def _open_fd(self, path: str | os.PathLike[str], flags: int) -> None:
        try:
            self._fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._closed = True
            raise self.error("open", exc.strerror or str(exc), errno=exc.errno) from exc

    def _read(self, offset: int, length: int) -> bytes:
        try:
            return pread_bytes(self._fd, offset, length)
        except (OSError, EOFError) as exc:
            raise self.io_error("read", offset, length, exc) from exc

    def _readinto(self, offset: int, buf: memoryview) -> None:
        try:
            pread_exact(self._fd, offset, buf)
        except (OSError, EOFError) as exc:
            raise self.io_error("read", offset, len(buf), exc) from exc

    def _write(self, offset: int, data: memoryview) -> None:
        try:
            pwrite_all(self._fd, offset, data)
        except OSError as exc:
            raise self.io_error("write", offset, len(data), exc) from exc

    def _flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise self.error("flush", exc.strerror or str(exc), errno=exc.errno) from exc

    def _close(self) -> None:
        os.close(self._fd)

    def _abandon_open(self) -> None:
        """Release the descriptor when the constructor fails after opening it."""
        os.close(self._fd)
        self._closed = True

    def io_error(
        self, operation: str, offset: int, length: int, exc: OSError | EOFError
    ) -> StorageError:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return self.error(
            operation,
            f"offset={offset} length={length}: {detail}",
            errno=exc.errno if isinstance(exc, OSError) else errno.EIO,
        )
