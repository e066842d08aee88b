"""Storage backends: one interface to a disk, whatever holds it.

Used by the tap (source disk), the applier (target disk), full sync and verification.
See docs/storage.md.
"""

from datapath.storage.backend import Extent, StorageBackend, StorageError, merge_extents
from datapath.storage.blockdev import BlockDeviceBackend, is_block_device
from datapath.storage.file import FileBackend
from datapath.storage.nbd_backend import NbdBackend, is_nbd_uri
from datapath.storage.spec import open_backend

__all__ = [
    "BlockDeviceBackend",
    "Extent",
    "FileBackend",
    "NbdBackend",
    "StorageBackend",
    "StorageError",
    "is_block_device",
    "is_nbd_uri",
    "merge_extents",
    "open_backend",
]
