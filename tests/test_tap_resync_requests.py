"""The tap acts on the resync requests of the receiver and the applier
(vib/resync_requests.py): a request for a VM it serves starts a full sync of it, at once
or, published while the tap was down, at its next start; other events, other VMs'
requests and requests already answered start nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from tap_helpers import (
    DiskSpec,
    HeldTopic,
    MiB,
    assert_replay_equals_source,
    caught_up,
    held_tap,
    replay_onto_files,
    running_tap,
    source_disk,
    tap_settings,
    wait_until,
    write_plan,
)

from datapath.journal import MarkerKind, decode_frame
from datapath.kafka import KafkaClusterSettings, KafkaMetrics, Producer
from datapath.protection import load_protection_plan
from datapath.provisioning import ensure_plan_topics
from datapath.topics import Stream, topic_name
from services.receiver.batcher import (
    BracketAbandoned,
    Event,
    QuarantinedMessage,
    SequenceGap,
    SequenceRegression,
)
from services.receiver.status_events import status_event
from vib.resync_requests import (
    Position,
    ResyncRequest,
    parse_resync_request,
    requests_to_act_on,
)


def event(
    vm_id: str,
    kind: str = "resync_request",
    reason: str = "sequence_gap",
    last_seq: int | None = None,
) -> bytes:
    body: dict[str, Any] = {"schema": 1, "source": "receiver", "vm_id": vm_id, "type": kind}
    if kind == "resync_request":
        body.update(reason=reason, detail=f"a {reason} in a test", last_seq=last_seq)
    return json.dumps(body).encode()


def applier_report(vm_id: str, last_seq: int | None, event_name: str = "needs-resync") -> bytes:
    """An applier's report (docs/applier.md, "Status reports")."""
    body = {"service": "applier", "event": event_name, "vm_id": vm_id, "health": "x"}
    body.update(reason="gap: seq 25..32 missing", wants="full-resync", last_seq=last_seq)
    return json.dumps(body).encode()


async def publish(cluster: KafkaClusterSettings, values: list[bytes]) -> list[int]:
    """Publishes status messages (each under a key of its own); their offsets."""
    async with Producer(cluster) as producer:
        deliveries = [
            await producer.send(topic_name(Stream.STATUS), value, os.urandom(8), partition=0)
            for value in values
        ]
        return [(await delivery).offset for delivery in deliveries]


def test_a_request_is_told_from_other_events_and_from_what_is_not_an_event() -> None:
    # After a regression the receiver drops one record more than the reused range.
    assert parse_resync_request(
        event("vm1", reason="sequence_regression", last_seq=41)
    ) == ResyncRequest("vm1", "sequence_regression", "a sequence_regression in a test", 42)
    assert parse_resync_request(event("vm1", reason="corrupt_record")) == ResyncRequest(
        "vm1", "corrupt_record", "a corrupt_record in a test", None
    )
    assert parse_resync_request(applier_report("vm1", 32)) == ResyncRequest(
        "vm1", "applier_needs_resync", "gap: seq 25..32 missing", 32
    )
    assert parse_resync_request(applier_report("vm1", None, "resync-applied")) is None
    assert parse_resync_request(b"[" * 100_000) is None  # nested deeper than json can go
    for value in (
        event("vm1", kind="resync_abandoned"),
        None,  # a tombstone
        b"\xff not json",
        b"[1, 2]",
        json.dumps({"type": "resync_request", "vm_id": 7}).encode(),
    ):
        assert parse_resync_request(value) is None


def test_only_requests_at_or_after_a_vms_offset_count_and_one_full_sync_answers_them() -> None:
    records = [
        (10, event("a")),  # before a's offset: read already
        (11, event("b")),  # not served here
        (12, event("a", reason="corrupt_record")),
        (13, b"garbage"),
        (14, event("a", reason="sequence_regression")),
        (15, event("c", kind="resync_abandoned")),
        (16, event("c")),
    ]
    chosen = requests_to_act_on(records, {"a": Position(11), "c": Position(16)})
    assert {vm: after for vm, (after, _) in chosen.items()} == {"a": 15, "c": 17}
    first = chosen["a"][1]
    assert first is not None and first.reason == "corrupt_record"
    assert requests_to_act_on(records, {"a": Position(15), "c": Position(17)}) == {}


def test_one_full_sync_numbered_past_every_range_answers_a_fetch() -> None:
    # A gap and a regression read together: the full sync must be numbered past the
    # regression's range, however they are ordered.
    records = [
        (0, event("a", last_seq=100)),
        (1, event("a", reason="corrupt_record")),  # no range
        (2, event("a", reason="sequence_regression", last_seq=5000)),
        (3, event("a", last_seq=200)),
    ]
    after, request = requests_to_act_on(records, {"a": Position(0)})["a"]
    assert after == 4 and request is not None
    assert (request.reason, request.last_seq) == ("sequence_gap", 5001)


def test_a_request_for_a_range_the_last_full_sync_covers_starts_none() -> None:
    position = {"a": Position(0, covered_from=500)}
    covered = [(0, event("a", last_seq=100)), (1, event("a", last_seq=499))]
    assert requests_to_act_on(covered, position) == {"a": (2, None)}
    for late in (event("a", last_seq=500), event("a", last_seq=None)):
        after, request = requests_to_act_on([*covered, (2, late)], position)["a"]
        assert after == 3 and request == parse_resync_request(late)


async def test_a_resync_request_starts_a_full_sync_now_and_after_a_restart(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    disks = [DiskSpec("d0", tmp_path / "src.img", 8 * MiB)]
    disks[0].path.write_bytes(os.urandom(disks[0].size))
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    vms = load_protection_plan(plan).vms
    await ensure_plan_topics(source_cluster, vms, metrics=KafkaMetrics(CollectorRegistry()))
    settings = tap_settings(tmp_path, plan)

    async with running_tap(settings) as worker:
        vm = worker.taps[vm_id]
        await wait_until(
            lambda: caught_up(vm.status()) and vm.stats.resyncs_completed == 1,
            "the first protection's full sync",
        )
        # The first try to act fails (a state directory that refuses the full sync's
        # flag): the request is acted on by the next one, not lost.
        request_full_sync = vm.request_full_sync
        refusals = [OSError(28, "No space left on device")]

        async def refused_once() -> None:
            if refusals:
                raise refusals.pop()
            await request_full_sync()

        vm.request_full_sync = refused_once  # type: ignore[method-assign]
        failures = "datamover_tap_resync_request_failures_total"
        failed_before = worker.registry.get_sample_value(failures) or 0.0
        # As after a sequence regression: an older epoch's stale frames reused numbers
        # this session has not reached yet. The full sync must be numbered past them.
        reused = vm.last_seq_assigned + 500
        offsets = await publish(
            source_cluster,
            [
                event(f"{vm_id}-other"),
                event(vm_id, kind="resync_abandoned"),
                b"not an event",
                event(vm_id, reason="sequence_regression", last_seq=reused),
            ],
        )
        await wait_until(lambda: vm.status()["resync_requests"] == 1, "the request acted on")
        await wait_until(
            lambda: caught_up(vm.status()) and vm.stats.resyncs_completed == 2,
            "the full sync it started",
        )
        assert vm.state.resync_offset("source") == offsets[-1] + 1
        covered_from = vm.state.resync_covered_from
        assert covered_from > reused + 1
        # A second report of a hole before that full sync's start starts nothing: here,
        # the applier's, repeated at each of its starts while it waits.
        [again] = await publish(source_cluster, [applier_report(vm_id, covered_from - 1)])
        await wait_until(lambda: vm.state.resync_offset("source") == again + 1, "the report read")
        assert vm.stats.resync_requests == 1 and not vm.full_sync_pending
        assert not refusals
        assert (worker.registry.get_sample_value(failures) or 0.0) >= failed_before + 1

    [offset] = await publish(source_cluster, [event(vm_id, reason="sequence_regression")])
    async with running_tap(settings) as worker:
        vm = worker.taps[vm_id]
        await wait_until(lambda: vm.stats.resync_requests == 1, "the request made while down")
        await wait_until(
            lambda: caught_up(vm.status()) and vm.stats.resyncs_completed == 1,
            "the full sync it started",
        )
        assert vm.state.resync_offset("source") == offset + 1
        metrics = worker.registry.get_sample_value(
            "datamover_tap_resync_requests_total", {"vm": vm_id}
        )
        assert metrics == 1

    result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert_replay_equals_source(result, [(disks[0].path, replays[0])])
    assert not result.gaps
    assert len(result.resyncs_completed) == 3  # the first protection's, and one per request
    assert result.resyncs_started[1] > reused + 1  # its RESYNC_START's number
    # Each one a full sync: every byte of the disk travelled three times.
    assert result.bytes["SYNC_BLOCK"] == 3 * disks[0].size


async def test_the_tap_numbers_past_a_reused_range_before_its_full_sync(tmp_path: Path) -> None:
    # After a sequence regression the receiver drops what is numbered up to one past the
    # range an older epoch reused; a full sync numbered in it would be lost with it. The
    # tap moves its numbering past it with HEARTBEAT markers, one after the other.
    source, topic = source_disk(tmp_path, os.urandom(MiB)), HeldTopic()
    async with held_tap(tmp_path, source, MiB, topic) as tap:
        start = tap.last_seq_assigned
        await tap.number_past(start + 3000)
        assert tap.last_seq_assigned == start + 3000
        await tap.number_past(start + 10)  # past it already: nothing more
        assert tap.last_seq_assigned == start + 3000
        await tap.number_past(start + 10**7)  # no tap gave such a number: refused
        assert tap.last_seq_assigned == start + 3000
        await wait_until(lambda: tap.last_seq_acked == start + 3000, "the markers acknowledged")
    records = [r for frame in map(decode_frame, topic.frames) for r in frame.records]
    filled = [r for r in records if start < r.seq <= start + 3000]
    assert [r.seq for r in filled] == list(range(start + 1, start + 3001))
    assert {r.marker for r in filled} == {MarkerKind.HEARTBEAT}


@pytest.mark.parametrize(
    ("event_", "expected"),
    [
        (SequenceGap("vm1", 3, 100, 140, 7), ("sequence_gap", 140)),
        (QuarantinedMessage("vm1", 8, b"x", "CRC", 3, 141, 150), ("corrupt_record", 150)),
        (
            QuarantinedMessage("vm1", 8, b"x", "bad header", None, None, None),
            ("corrupt_record", None),
        ),
        # The reused range ends at next_seq - 1, and the receiver drops one record more.
        (SequenceRegression("vm1", 4, 3, 120, 151, 9), ("sequence_regression", 151)),
        (BracketAbandoned("vm1", 5, 6, 170), None),
    ],
)
def test_the_receivers_own_status_events_are_read_as_it_writes_them(
    event_: Event, expected: tuple[str, int | None] | None
) -> None:
    _, body = status_event(event_, instance="r-0", tap_topic="dm.tap.vm1", deadletter_topic="d")
    request = parse_resync_request(json.dumps(body).encode())
    if expected is None:
        assert request is None
    else:
        assert request is not None and (request.vm_id, request.reason, request.last_seq) == (
            "vm1",
            *expected,
        )
