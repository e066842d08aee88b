"""Turn a disk spec (an NBD URI, a block device path or a file path) into a backend."""

from __future__ import annotations

from datapath.storage.backend import StorageBackend, StorageError
from datapath.storage.blockdev import BlockDeviceBackend, is_block_device
from datapath.storage.file import FileBackend
from datapath.storage.nbd_backend import NbdBackend, is_nbd_uri

_FILE_URI = "file://"


def open_backend(
    spec: str, *, create_size: int | None = None, readonly: bool = False
) -> StorageBackend:
    """Open a disk.

    - "nbd://...", "nbds://...", "nbd+unix://...", ... -> NbdBackend
    - a path to a block device -> BlockDeviceBackend
    - any other path (or "file:///path") -> FileBackend, created sparse with create_size
      when it does not exist yet.

    For an NBD export or a block device, which cannot be created here, create_size is
    the size the caller expects: a smaller disk is refused.
    """
    if is_nbd_uri(spec):
        backend: StorageBackend = NbdBackend(spec, readonly=readonly)
    else:
        path = spec.removeprefix(_FILE_URI) if spec.startswith(_FILE_URI) else spec
        if not path:
            raise StorageError("open: empty disk spec", operation="open")
        if is_block_device(path):
            backend = BlockDeviceBackend(path, readonly=readonly)
        else:
            return FileBackend(path, create_size=create_size, readonly=readonly)
    if create_size is not None and backend.size < create_size:
        size = backend.size
        backend.close()
        raise backend.error(
            "open", f"the disk has {size} bytes, smaller than the required {create_size}"
        )
    return backend
