"""The applier's durable memory: per VM, what has been applied to the target disks.

One small JSON file per VM in the state directory, replaced atomically (write a temporary
file, fsync it, rename it over the old one, fsync the directory), so after a crash the
file holds either the old or the new state, never a mix.

The `intent` is written before a batch (or a group of batches, or a resync bracket)
touches a disk and cleared in the same write that advances the applied position. While
it is set the target disks may hold a half-applied unit: nobody may expose them until
the unit has been re-applied from Kafka.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

log = logging.getLogger(__name__)

STATE_VERSION = 1


class StateFileError(RuntimeError):
    """A state file exists but cannot be read; the applier refuses to guess."""


class Health(StrEnum):
    OK = "ok"
    # A gap, a corrupt batch or a stale epoch: nothing more is applied until a resync
    # bracket arrives.
    NEEDS_RESYNC = "needs-resync"


@dataclass(frozen=True, slots=True)
class ApplyIntent:
    """A unit about to be applied: batches first_seq..last_seq, read from Kafka offsets
    start_offset..end_offset (inclusive). resync_id != 0 for a resync bracket."""

    first_seq: int
    last_seq: int
    start_offset: int
    end_offset: int
    resync_id: int = 0


@dataclass(frozen=True, slots=True)
class VmState:
    vm_id: str
    # Last sequence number applied; None when nothing has been applied yet.
    applied_seq: int | None = None
    # Kafka offset of the last message of the last applied batch (-1: none).
    applied_offset: int = -1
    # Source time (max_ts_ns of the last applied batch): the target equals the source
    # as it was at this moment.
    source_ts_ns: int = 0
    epoch: int = 0
    health: Health = Health.OK
    reason: str = ""
    paused: bool = False
    intent: ApplyIntent | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def next_offset(self) -> int:
        return self.applied_offset + 1

    def with_changes(self, **changes: Any) -> Self:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = STATE_VERSION
        data["health"] = self.health.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r}, expected {STATE_VERSION}")
        intent = data.get("intent")
        return cls(
            vm_id=str(data["vm_id"]),
            applied_seq=None if data["applied_seq"] is None else int(data["applied_seq"]),
            applied_offset=int(data["applied_offset"]),
            source_ts_ns=int(data["source_ts_ns"]),
            epoch=int(data["epoch"]),
            health=Health(data["health"]),
            reason=str(data.get("reason", "")),
            paused=bool(data.get("paused", False)),
            intent=None if intent is None else ApplyIntent(**intent),
            extra=dict(data.get("extra") or {}),
        )


class StateStore:
    """Reads and durably replaces the per-VM state files of one state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, vm_id: str) -> Path:
        return self.directory / f"{vm_id}.json"

    def load(self, vm_id: str) -> VmState:
        path = self.path(vm_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return VmState(vm_id=vm_id)
        except OSError as exc:
            raise StateFileError(f"cannot read applier state {path}: {exc.strerror}") from exc
        try:
            state = VmState.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateFileError(f"applier state {path} is unreadable: {exc}") from exc
        if state.vm_id != vm_id:
            raise StateFileError(f"applier state {path} belongs to VM {state.vm_id!r}")
        return state

    def save(self, state: VmState) -> None:
        """Durable when it returns: the file, then its directory entry, are fsynced."""
        path = self.path(state.vm_id)
        temporary = path.with_name(path.name + ".tmp")
        payload = json.dumps(state.to_json(), sort_keys=True).encode()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
