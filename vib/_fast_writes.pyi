"""Types of the C extension vib/_fast_writes.c (see there)."""

from typing import Any

HARDWARE_CRC: int
META_SIZE: int

class FastWrites:
    def __init__(
        self,
        *,
        fd: int,
        disk: int,
        size: int,
        hot: dict[int, Any],
        extent_shift: int,
        disk_shift: int,
    ) -> None: ...
    def run(
        self,
        buf: bytearray,
        pos: int,
        end: int,
        out: bytearray,
        body: bytearray,
        used: int,
        meta: bytearray,
        seq: int,
        gen: int,
        tick: int,
        room: int,
        length_max: int,
        /,
    ) -> tuple[int, int, int, int, int, int]: ...

def encode_write_record(disk: int, seq: int, offset: int, data: bytes, ts_ns: int, /) -> bytes: ...
def crc32c(data: bytes, value: int = 0, /) -> int: ...
def payload_buffer(size: int, /) -> bytearray: ...
