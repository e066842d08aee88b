"""The tap's NBD front end: an asyncio NBD server (fixed newstyle, structured replies,
base:allocation) over any Export. See docs/nbd.md."""

from vib.nbd.export import Export, ExportError
from vib.nbd.server import NbdServer
from vib.nbd.storage_export import StorageExport

__all__ = ["Export", "ExportError", "NbdServer", "StorageExport"]
