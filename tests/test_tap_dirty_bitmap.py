"""The dirty bitmap (guarantee 3 during an outage): every region written while Kafka is
away is remembered, across a restart, until a resync has covered it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vib.dirty_bitmap import DirtyBitmap

GRAIN = 64 * 1024
SIZE = 40 * GRAIN + 1000  # not a multiple of the granularity


def open_bitmap(path: Path, size: int = SIZE) -> DirtyBitmap:
    bitmap = DirtyBitmap(path, disk_size=size, granularity=GRAIN)
    bitmap.open()
    return bitmap


def expected_regions(ranges: list[tuple[int, int]], size: int = SIZE) -> set[int]:
    grains = set()
    for offset, length in ranges:
        if length > 0:
            grains.update(range(offset // GRAIN, (min(offset + length, size) - 1) // GRAIN + 1))
    return grains


def regions_of(bitmap: DirtyBitmap) -> set[int]:
    grains = set()
    for offset, length in bitmap.runs():
        assert offset % GRAIN == 0
        grains.update(range(offset // GRAIN, (offset + length - 1) // GRAIN + 1))
    return grains


ranges_strategy = st.lists(
    st.tuples(st.integers(0, SIZE - 1), st.integers(0, 20 * GRAIN)).map(
        lambda t: (t[0], min(t[1], SIZE - t[0]))
    ),
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ranges=ranges_strategy)
def test_marked_regions_survive_a_reopen_exactly(
    tmp_path_factory: pytest.TempPathFactory, ranges: list[tuple[int, int]]
) -> None:
    directory = tmp_path_factory.mktemp("bitmap")
    bitmap = open_bitmap(directory / "d.bitmap")
    for offset, length in ranges:
        bitmap.mark(offset, length)
    bitmap.flush()
    # No close(): as after a SIGKILL, only what reached the file counts.
    again = open_bitmap(directory / "d.bitmap")
    assert regions_of(again) == expected_regions(ranges)
    assert again.any() == bool(expected_regions(ranges))
    assert sum(length for _, length in again.runs()) <= SIZE
    bitmap.close()
    again.close()


def test_runs_are_clipped_to_the_disk_and_merged(tmp_path: Path) -> None:
    bitmap = open_bitmap(tmp_path / "d.bitmap")
    bitmap.mark(3 * GRAIN - 1, 2)  # touches grains 2 and 3
    bitmap.mark(4 * GRAIN, 1)  # grain 4: one run with 2..3
    bitmap.mark(SIZE - 10, 10)  # the last, partial grain
    assert list(bitmap.runs()) == [(2 * GRAIN, 3 * GRAIN), (40 * GRAIN, 1000)]
    assert bitmap.dirty_bytes() == 3 * GRAIN + 1000


def test_a_completed_resync_keeps_only_the_marks_made_since_for_other_reasons(
    tmp_path: Path,
) -> None:
    bitmap = open_bitmap(tmp_path / "d.bitmap")
    bitmap.mark(0, 4 * GRAIN)
    bitmap.snapshot()
    bitmap.mark(20 * GRAIN, GRAIN, transient=True)  # a live write inside the bracket
    bitmap.mark(GRAIN, 10)  # rewritten while Kafka was away: must be resynced again
    bitmap.mark(10 * GRAIN, GRAIN)
    bitmap.resynced()
    assert list(bitmap.runs()) == [(GRAIN, GRAIN), (10 * GRAIN, GRAIN)]


def test_an_abandoned_resync_keeps_every_mark(tmp_path: Path) -> None:
    bitmap = open_bitmap(tmp_path / "d.bitmap")
    bitmap.mark(0, GRAIN)
    bitmap.snapshot()
    bitmap.mark(20 * GRAIN, GRAIN, transient=True)
    bitmap.abandon_snapshot()
    assert list(bitmap.runs()) == [(0, GRAIN), (20 * GRAIN, GRAIN)]


def test_a_bitmap_of_another_geometry_becomes_all_dirty(tmp_path: Path) -> None:
    bitmap = open_bitmap(tmp_path / "d.bitmap")
    bitmap.mark(0, 1)
    bitmap.close()
    grown = open_bitmap(tmp_path / "d.bitmap", size=2 * SIZE)
    assert list(grown.runs()) == [(0, 2 * SIZE)]
    assert not grown.created


def test_a_new_bitmap_is_clean_and_says_so(tmp_path: Path) -> None:
    bitmap = open_bitmap(tmp_path / "d.bitmap")
    assert bitmap.created
    assert not bitmap.any()
    assert list(bitmap.runs()) == []


class _Watched:
    """The bitmap's mapping, checked after every change: the bits of `kept` never clear."""

    def __init__(self, real: Any, bitmap: DirtyBitmap, kept: set[int]) -> None:
        self.real, self.bitmap, self.kept = real, bitmap, kept

    def __getitem__(self, key: Any) -> Any:
        return self.real[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.real[key] = value
        # What a SIGKILL at this moment would leave in the page cache.
        assert self.kept <= regions_of(self.bitmap), "a bit that stays went through 0"

    def flush(self) -> None:
        self.real.flush()


def test_a_resync_that_completes_never_clears_a_bit_that_stays_even_for_a_moment(
    tmp_path: Path,
) -> None:
    bitmap = open_bitmap(tmp_path / "d.bitmap")
    bitmap.mark(0, SIZE)
    bitmap.snapshot()  # a resync of the whole disk starts
    bitmap.mark(5 * GRAIN, 10)  # written again while the resync ran
    bitmap.mark(30 * GRAIN, 3 * GRAIN)
    kept = expected_regions([(5 * GRAIN, 10), (30 * GRAIN, 3 * GRAIN)])
    real = bitmap._map
    bitmap._map = _Watched(real, bitmap, kept)  # type: ignore[assignment]
    bitmap.resynced()
    bitmap._map = real
    assert regions_of(bitmap) == kept


class _Crash(Exception):
    pass


def test_a_crash_while_a_bitmap_of_another_geometry_is_replaced_leaves_every_bit_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.bitmap"
    old = open_bitmap(path)
    old.mark(3 * GRAIN, 1)
    old.close()

    def crash(*args: object, **kwargs: object) -> None:
        raise _Crash

    # The disk grew: the file is rewritten, and the tap is killed while it marks.
    monkeypatch.setattr(DirtyBitmap, "_set_bits", crash)
    with pytest.raises(_Crash):
        open_bitmap(path, size=SIZE * 2)
    monkeypatch.undo()
    reopened = open_bitmap(path, size=SIZE * 2)
    assert regions_of(reopened) == expected_regions([(0, SIZE * 2)], size=SIZE * 2)


def test_an_existing_bitmap_file_left_empty_marks_everything(tmp_path: Path) -> None:
    # What a crash while a bitmap file is being rewritten may leave: no header, no bits.
    path = tmp_path / "d.bitmap"
    path.write_bytes(b"")
    bitmap = open_bitmap(path)
    assert not bitmap.created
    assert regions_of(bitmap) == expected_regions([(0, SIZE)])
