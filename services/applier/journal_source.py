"""What the applier needs from a VM's target journal (its batch topic): read from an
offset on, learn where the journal ends. The Kafka implementation lives in
`kafka_source.py`; anything with these methods will do (an in-memory journal in tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class JournalMessage:
    offset: int
    value: bytes


class JournalSource(Protocol):
    """One VM's batch topic (one partition), read_committed."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def seek(self, offset: int) -> None:
        """The next fetch starts at `offset` (or at the log start when retention removed
        it: the sequence check then sees the gap)."""

    async def fetch(self, timeout_s: float) -> list[JournalMessage]:
        """Committed messages in offset order; [] when none arrived within the timeout."""

    async def end_offset(self) -> int:
        """Offset after the last committed message (the last stable offset)."""

    async def position(self) -> int:
        """Offset of the next message a fetch would return. Past the last message read,
        this also skips transaction markers, which occupy offsets but carry no message:
        it reaches `end_offset()` exactly when everything committed has been read."""


class StatusSink(Protocol):
    """Where the applier reports a VM's state for the control plane and the source site."""

    async def publish(self, vm_id: str, report: dict[str, Any]) -> None: ...
