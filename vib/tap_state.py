"""What the tap keeps on disk for one VM, beside its activity log and dirty bitmaps.

`<state_dir>/<vm_id>/`:
- `epoch`: the last epoch used, incremented durably every time the tap starts publishing
  (a start, or a reconnection after an outage), so frames of an older session can be
  told from newer ones;
- `last_seq`: the last sequence number Kafka acknowledged, written lazily; only used
  when the tap topic holds no frame to continue from (e.g. everything expired);
- `resync_offset.<site>`: the offset of that site's status topic after the last resync
  request read, and `resync_covered_from`: the sequence number from which the last full
  sync started for one covers the VM (vib/resync_requests.py);
- `full_sync`: present while a full sync is pending or running: `requested` until every
  bitmap has been marked dirty and made durable, then `marked`. A tap that finds
  `requested` marks the bitmaps again (the marks may not have reached the disk).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from datapath.storage.linux import fsync_directory

log = logging.getLogger(__name__)


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def _read_int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0
    try:
        return int(text)
    except ValueError as exc:
        raise ValueError(f"{path} holds {text!r}, not a number") from exc


def _read_saved(path: Path) -> int | None:
    """A number saved for later in `path`; None when there is none, or, loudly, when it
    cannot be read: such a file must not keep the tap, which serves every VM's guest, from
    starting."""
    try:
        return _read_int(path) if path.exists() else None
    except (ValueError, OSError) as exc:
        log.error("ignoring what cannot be read: %s", exc)
        return None


class TapState:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.existed = False

    def open(self) -> None:
        """Creates the directory; `existed` says whether the VM was protected before."""
        self.existed = self.directory.is_dir()
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def activity_log_path(self) -> Path:
        return self.directory / "activity.log"

    def bitmap_path(self, disk_name: str) -> Path:
        return self.directory / f"{disk_name}.bitmap"

    @property
    def epoch(self) -> int:
        return _read_int(self.directory / "epoch")

    def next_epoch(self, *, after: int) -> int:
        """A new epoch, above the last one this directory gave and above `after` (the
        epoch of the topic's last frame: a state directory restored from a backup, or a
        VM moved to another host, must not go back)."""
        epoch = max(self.epoch, after) + 1
        _write_durably(self.directory / "epoch", f"{epoch}\n")
        return epoch

    @property
    def last_seq(self) -> int:
        """The last sequence number saved (0: none, or unreadable), a fallback for a topic
        that holds no frame any more."""
        return _read_saved(self.directory / "last_seq") or 0

    def save_last_seq(self, seq: int) -> None:
        """Made durable (run it off the event loop): the topic is the authority, but when
        retention has emptied it, this is all there is to go on."""
        _write_durably(self.directory / "last_seq", f"{seq}\n")

    def resync_offset(self, site: str) -> int | None:
        """Where to read `site`'s resync requests from (None: never read there, or
        unreadable)."""
        return _read_saved(self.directory / f"resync_offset.{site}")

    def save_resync_offset(self, site: str, offset: int) -> None:
        """Made durable (run it off the event loop)."""
        _write_durably(self.directory / f"resync_offset.{site}", f"{offset}\n")

    @property
    def resync_covered_from(self) -> int:
        """The number from which the last full sync started for a resync request covers
        the VM (0: none, or unreadable)."""
        return _read_saved(self.directory / "resync_covered_from") or 0

    def save_resync_covered_from(self, seq: int) -> None:
        """Made durable (run it off the event loop)."""
        _write_durably(self.directory / "resync_covered_from", f"{seq}\n")

    @property
    def full_sync(self) -> str | None:
        """None, "requested" or "marked" (see the module's docstring)."""
        try:
            return (self.directory / "full_sync").read_text().strip() or "requested"
        except FileNotFoundError:
            return None

    @property
    def full_sync_pending(self) -> bool:
        return (self.directory / "full_sync").exists()

    def set_full_sync(self, state: str | None) -> None:
        path = self.directory / "full_sync"
        if state is not None:
            _write_durably(path, f"{state}\n")
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
