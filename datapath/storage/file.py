"""A disk kept as a sparse raw file: holes are punched for zeros and trims, and
SEEK_DATA/SEEK_HOLE tell which parts are allocated."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from datapath.storage.backend import Extent
from datapath.storage.fd import FdBackend
from datapath.storage.linux import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    UNSUPPORTED_ERRNOS,
    fallocate,
    fsync_directory,
)

log = logging.getLogger(__name__)


class FileBackend(FdBackend):
    """A raw image file.

    create_size: create the file (sparse) with this size when it does not exist; an
    existing smaller file is grown (sparse), an existing larger one is refused rather
    than truncated. The size is fixed for the life of the backend.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create_size: int | None = None,
        readonly: bool = False,
    ) -> None:
        super().__init__(os.fspath(path))
        self.path = Path(path)
        self.readonly = readonly
        if readonly and create_size is not None:
            raise self.error("open", "create_size cannot be used with readonly")
        if create_size is not None and create_size < 0:
            raise self.error("open", f"create_size {create_size} is negative")
        flags = os.O_RDONLY if readonly else os.O_RDWR
        created = False
        if create_size is not None:
            try:
                self._fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                created = True
            except OSError:
                pass  # it exists, or the open below reports why it cannot be made
        if not created:
            self._open_fd(self.path, flags | (os.O_CREAT if create_size is not None else 0))
        try:
            self._size = self._settle_size(create_size)
            if created:
                self._make_entry_durable()
        except BaseException:
            self._abandon_open()
            raise
        # Both flip to False the first time the file system refuses, to skip the
        # doomed system call afterwards.
        self._punch_supported = True
        self._zero_range_supported = True

    def _make_entry_durable(self) -> None:
        # Data flushed into a file whose directory entry is not durable is lost with the
        # file at a power cut, while the applier's state says applied.
        try:
            fsync_directory(self.path.parent)
        except OSError as exc:
            raise self.error("create", exc.strerror or str(exc), errno=exc.errno) from exc

    def _settle_size(self, create_size: int | None) -> int:
        try:
            size = os.fstat(self._fd).st_size
            if create_size is not None and size < create_size:
                os.ftruncate(self._fd, create_size)
                size = create_size
        except OSError as exc:
            raise self.error("open", exc.strerror or str(exc), errno=exc.errno) from exc
        if create_size is not None and size != create_size:
            raise self.error(
                "open", f"existing file is {size} bytes, larger than the requested {create_size}"
            )
        return size

    @property
    def size(self) -> int:
        return self._size

    # --- I/O -----------------------------------------------------------------------------

    def _write_zeroes(self, offset: int, length: int, punch_hole: bool) -> None:
        if punch_hole:
            self._punch(offset, length, "write_zeroes")
            return
        # ZERO_RANGE allocates (as unwritten extents that read as zeros) without
        # transferring data: what NBD's NO_HOLE asks for.
        if self._zero_range_supported:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_ERRNOS:
                    raise self.io_error("write_zeroes", offset, length, exc) from exc
                log.debug("%s: FALLOC_FL_ZERO_RANGE unsupported, writing zeros", self.name)
                self._zero_range_supported = False
        self._write_zeros_by_data(offset, length)

    def _trim(self, offset: int, length: int) -> None:
        self._punch(offset, length, "trim")

    def _punch(self, offset: int, length: int, operation: str) -> None:
        # The kernel zeroes the partial blocks at either end itself and deallocates
        # the whole blocks in between.
        if self._punch_supported:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_ERRNOS:
                    raise self.io_error(operation, offset, length, exc) from exc
                log.debug("%s: FALLOC_FL_PUNCH_HOLE unsupported, writing zeros", self.name)
                self._punch_supported = False
        self._write_zeros_by_data(offset, length)

    # --- allocation ------------------------------------------------------------------

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        end = offset + length
        pos = offset
        while pos < end:
            try:
                data_start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but hole up to end of file
                    data_start = end
                elif exc.errno in UNSUPPORTED_ERRNOS:  # no hole reporting: all data
                    yield Extent(pos, end - pos, False)
                    return
                else:
                    raise self.io_error("allocated_extents", pos, end - pos, exc) from exc
            data_start = min(data_start, end)
            if data_start > pos:
                yield Extent(pos, data_start - pos, True)
                pos = data_start
            if pos >= end:
                return
            try:
                # Always succeeds inside the file: end of file counts as a hole.
                hole_start = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            except OSError as exc:
                raise self.io_error("allocated_extents", pos, end - pos, exc) from exc
            if hole_start <= pos:  # the file changed between the two seeks
                hole_start = min(end, pos + 1)
            yield Extent(pos, hole_start - pos, False)
            pos = hole_start

    def allocated_bytes(self) -> int:
        self._check_open("allocated_bytes")
        try:
            return os.fstat(self._fd).st_blocks * 512
        except OSError as exc:
            raise self.error("allocated_bytes", exc.strerror or str(exc), errno=exc.errno) from exc
