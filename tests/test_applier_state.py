"""The applier's state file: two slots written in turn, so that a crash in the middle of
a save leaves the previous state or the new one, never a mix and never nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.applier import state as state_module
from services.applier.state import (
    MAX_STATE_BYTES,
    SLOT_SIZE,
    ApplyIntent,
    Health,
    StateFileError,
    StateStore,
    VmState,
)


def states(vm_id: str = "vm-a") -> st.SearchStrategy[VmState]:
    intents = st.none() | st.builds(
        ApplyIntent,
        st.integers(1, 2**40),
        st.integers(1, 2**40),
        st.integers(0, 2**40),
        st.integers(0, 2**40),
        st.integers(0, 2**20),
    )
    return st.builds(
        VmState,
        vm_id=st.just(vm_id),
        applied_seq=st.none() | st.integers(0, 2**40),
        applied_offset=st.integers(-1, 2**40),
        source_ts_ns=st.integers(0, 2**62),
        epoch=st.integers(0, 2**20),
        health=st.sampled_from(list(Health)),
        reason=st.text(max_size=200),
        paused=st.booleans(),
        intent=intents,
    )


class Crash(Exception):
    """The process died here."""


def crash_after(monkeypatch: pytest.MonkeyPatch, written_bytes: int) -> list[bytes]:
    """The next pwrite of the store lands only its first `written_bytes`, then the
    process dies (what the disk may hold after a power cut mid-write). Returns the list
    that receives what that pwrite meant to write."""
    real = os.pwrite
    intended: list[bytes] = []

    def torn(fd: int, data: bytes, offset: int) -> int:
        intended.append(bytes(data))
        real(fd, data[:written_bytes], offset)
        raise Crash()

    monkeypatch.setattr(state_module.os, "pwrite", torn)
    return intended


def test_a_fresh_store_has_nothing_applied(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.prepare()
    assert store.load("vm-a") == VmState(vm_id="vm-a")


def test_saves_alternate_slots_in_a_file_that_never_grows(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for seq in range(1, 6):
        store.save(VmState(vm_id="vm-a", applied_seq=seq, applied_offset=seq * 10))
        assert store.path("vm-a").stat().st_size == 2 * SLOT_SIZE
        assert StateStore(tmp_path).load("vm-a").applied_seq == seq
    store.close()
    assert [p.name for p in tmp_path.iterdir()] == ["vm-a.state"]


@settings(max_examples=60, deadline=None)
@given(
    before=st.lists(states(), min_size=0, max_size=4),
    new=states(),
    cut=st.integers(0, 2000),
)
def test_a_save_cut_short_leaves_the_previous_state(
    tmp_path_factory: pytest.TempPathFactory,
    before: list[VmState],
    new: VmState,
    cut: int,
) -> None:
    directory = tmp_path_factory.mktemp("state")
    store = StateStore(directory)
    for state in before:
        store.save(state)
    previous = before[-1] if before else VmState(vm_id="vm-a")
    # The slot this save writes, as it is before (none: the save creates the file).
    slot_offset = (len(before) + 1) % 2 * SLOT_SIZE
    old_slot = store.path("vm-a").read_bytes()[slot_offset:] if before else b""
    with pytest.MonkeyPatch.context() as patch:
        intended = crash_after(patch, cut)
        with pytest.raises(Crash):
            store.save(new)
    store.close()
    # After the restart: the old state, or the new one if the whole slot had landed (the
    # part the crash cut off may have held those very bytes already: the same payload
    # saved two generations ago, say).
    recovered = StateStore(directory).load("vm-a")
    slot = intended[0]
    landed = bool(before) and old_slot[cut : len(slot)] == slot[cut:]
    assert recovered == previous or (landed and recovered == new)


def test_a_slot_damaged_later_falls_back_and_two_damaged_slots_are_refused(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path)
    first = VmState(vm_id="vm-a", applied_seq=1, applied_offset=0)
    second = VmState(vm_id="vm-a", applied_seq=2, applied_offset=1)
    store.save(first)
    store.save(second)
    store.close()
    path = store.path("vm-a")
    with path.open("r+b") as f:
        f.seek(0 * SLOT_SIZE + 30)  # generation 2 lives in slot 0
        f.write(b"garbage")
    assert StateStore(tmp_path).load("vm-a") == first
    with path.open("r+b") as f:
        f.seek(1 * SLOT_SIZE + 30)
        f.write(b"garbage")
    with pytest.raises(StateFileError, match="no intact slot"):
        StateStore(tmp_path).load("vm-a")


def test_the_state_file_of_an_earlier_applier_is_read_then_retired(tmp_path: Path) -> None:
    legacy = VmState(vm_id="vm-a", applied_seq=7, applied_offset=70, epoch=3)
    (tmp_path / "vm-a.json").write_text(json.dumps(legacy.to_json()))
    store = StateStore(tmp_path)
    assert store.load("vm-a") == legacy
    later = legacy.with_changes(applied_seq=8, applied_offset=80)
    store.save(later)
    assert not (tmp_path / "vm-a.json").exists()
    assert StateStore(tmp_path).load("vm-a") == later


def test_a_first_save_cut_short_keeps_the_earlier_appliers_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = VmState(vm_id="vm-a", applied_seq=7, applied_offset=70)
    (tmp_path / "vm-a.json").write_text(json.dumps(legacy.to_json()))
    store = StateStore(tmp_path)
    store.load("vm-a")
    store._open("vm-a")  # the slotted file exists, the save below is its first
    crash_after(monkeypatch, 10)
    with pytest.raises(Crash):
        store.save(legacy.with_changes(applied_seq=8))
    monkeypatch.undo()
    assert StateStore(tmp_path).load("vm-a") == legacy
    assert (tmp_path / "vm-a.json").exists()


def test_a_state_larger_than_a_slot_is_refused_and_the_old_one_kept(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    kept = VmState(vm_id="vm-a", applied_seq=3, applied_offset=30)
    store.save(kept)
    with pytest.raises(StateFileError, match="more than a slot holds"):
        store.save(kept.with_changes(reason="x" * MAX_STATE_BYTES))
    assert StateStore(tmp_path).load("vm-a") == kept


def test_an_earlier_appliers_file_left_by_a_crash_is_ignored_then_retired(
    tmp_path: Path,
) -> None:
    saved = VmState(vm_id="vm-a", applied_seq=9, applied_offset=90)
    store = StateStore(tmp_path)
    store.save(saved)
    store.close()
    # The crash came between that first save and the unlink of the old file.
    stale = VmState(vm_id="vm-a", applied_seq=7, applied_offset=70)
    (tmp_path / "vm-a.json").write_text(json.dumps(stale.to_json()))
    restarted = StateStore(tmp_path)
    assert restarted.load("vm-a") == saved
    restarted.save(saved.with_changes(applied_seq=10))
    restarted.close()
    assert not (tmp_path / "vm-a.json").exists()
