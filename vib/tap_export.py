"""One protected disk served over NBD: reads from the source disk, writes through the tap.

Export name: "<vm_id>/<disk_name>". Every write, zero, trim and flush goes through the
VM's write path (`VmTap`), so it is sequenced and published; reads and block status go
straight to the source storage.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from vib.nbd.export import Buffer, WriteRun
from vib.nbd.storage_export import backend_block_status
from vib.vm_tap import TapDisk, VmTap


def export_name(vm_id: str, disk_name: str) -> str:
    return f"{vm_id}/{disk_name}"


class TapExport:
    """Implements vib.nbd's Export protocol over a VM's write path."""

    read_only = False
    can_zero = True
    can_flush = True
    can_fua = True
    # One backend per disk, shared by every connection: a flush on any connection
    # makes every connection's completed writes durable.
    can_multi_conn = True
    can_cache = False
    supports_block_status = True

    def __init__(self, vm: VmTap, disk: TapDisk) -> None:
        self._vm = vm
        self._disk = disk
        self._backend = disk.backend
        self.name = export_name(vm.vm_id, disk.name)
        self.description = f"Datamover tap: VM {vm.vm_id}, disk {disk.name}"
        self.size = disk.backend.size
        self.can_trim = disk.backend.can_trim
        # The hot path: the server calls the write path's coroutine directly, without a
        # coroutine of this class around it.
        self.write: Callable[[int, memoryview, bool], Coroutine[Any, Any, None]] = partial(
            vm.write, disk
        )
        if disk.fast is not None:
            self.write_run: WriteRun = partial(vm.write_run, disk)

    async def read(self, offset: int, length: int) -> Buffer:
        return self._backend.read(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool) -> None:
        await self._vm.write_zeroes(self._disk, offset, length, may_trim=may_trim, fua=fua)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._vm.trim(self._disk, offset, length, fua)

    async def flush(self) -> None:
        await self._vm.flush(self._disk)

    async def cache(self, offset: int, length: int) -> None:
        return None

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return backend_block_status(self._backend, offset, length)
