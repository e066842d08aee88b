"""The tap's answer to the resync requests of the receiver and the applier.

What the receiver cannot batch (a sequence gap, a corrupt tap message, a sequence
regression: see docs/receiver.md) it reports as a `resync_request` event on the source
site's status topic, and the applier stops that VM at the hole until a full resync
repairs its disks. What only the applier finds (batches lost to retention before the
transceiver copied them, a corrupt batch on the target site) it reports as a
`needs-resync` report on its own site's status topic (docs/applier.md). Nothing else acts
on those until the control plane exists, so the tap does (setting
`act_on_resync_requests`, on by default): it follows the status topic of both sites, and
a request for a VM it serves starts a full sync of that VM (`VmTap.request_full_sync`),
one resync bracket that the applier applies as one unit past the hole. Requests read in
one fetch for the same VM (one incident often yields a gap and a regression together)
start one full sync, and a request for a range that the last full sync started already
covers starts none (see `Position`): the applier repeats its report at every start while
it waits.

Each VM's state directory keeps, per site, the offset after the last request read, and
the number from which its last full sync covers it (`TapState.resync_offset`,
`TapState.resync_covered_from`): a restarted tap acts on the requests published while it
was down, and on none twice (a crash between starting the full sync and saving acts on
it once more: a second full sync, harmless). A VM seen for the first time starts at the
topic's end: older events are about an earlier protection of the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka.structs import TopicPartition
from prometheus_client import Counter

from datapath.kafka import Consumer, KafkaClusterSettings, KafkaError, backoff_delay
from datapath.topics import Stream, topic_name
from vib.vm_tap import VmTap

log = logging.getLogger(__name__)

_FETCH_WAIT_MS = 500
_RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    vm_id: str
    reason: str
    detail: str
    # The last sequence number the hole may hold (None: not known, a corrupt message or
    # batch that could not be read): a full sync numbered after it repairs the VM.
    last_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Position:
    """Where one VM stands: the status topic offset after the last request read, and the
    sequence number from which the last full sync started for a request is sure to cover
    the VM (its RESYNC_START comes later): a request whose range ends before that number
    is answered already (one hole may be reported again: by the receiver, a quarantined
    message and then the gap it leaves; by the applier, at each of its starts while it
    waits). A request without a range (an unreadable message or batch) is always acted on."""

    offset: int
    covered_from: int = 0


def parse_resync_request(value: bytes | None) -> ResyncRequest | None:
    """The resync request a status message holds; None for any other event, a tombstone,
    or a message that is not a readable event (logged: it is skipped, not fatal)."""
    if value is None:
        return None
    try:
        event = json.loads(value)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, nested too deep
        log.warning("skipping a status message that is not JSON: %.200s", exc)
        return None
    if not isinstance(event, dict):
        return None
    if event.get("type") == "resync_request":  # the receiver's
        reason, detail = str(event.get("reason", "unknown")), str(event.get("detail", ""))
    elif event.get("service") == "applier" and event.get("event") == "needs-resync":
        reason, detail = "applier_needs_resync", str(event.get("reason", ""))
    else:
        return None
    vm_id = event.get("vm_id")
    if not isinstance(vm_id, str):
        log.warning("skipping a resync request without a VM id: %.200r", event)
        return None
    last_seq = event.get("last_seq")
    if type(last_seq) is not int:
        last_seq = None
    elif reason == "sequence_regression":
        # The receiver drops one record more: the first past the reused numbers.
        last_seq += 1
    return ResyncRequest(vm_id, reason, detail, last_seq)


def requests_to_act_on(
    records: Iterable[tuple[int, bytes | None]], positions: Mapping[str, Position]
) -> dict[str, tuple[int, ResyncRequest | None]]:
    """Status messages (offset, value) read in order: for each VM of `positions` with
    resync requests at or after its offset, the offset after the last of them, and what
    its last full sync does not cover (None: it covers them all): the first such request,
    with the largest `last_seq` known of them all, since one full sync, numbered after
    that, answers them all."""
    chosen: dict[str, tuple[int, ResyncRequest | None]] = {}
    for offset, value in records:
        request = parse_resync_request(value)
        if request is None:
            continue
        position = positions.get(request.vm_id)
        if position is None or offset < position.offset:
            continue
        uncovered = chosen.get(request.vm_id, (0, None))[1]
        if request.last_seq is None or request.last_seq >= position.covered_from:
            if uncovered is None:
                uncovered = request
            elif request.last_seq is not None:
                known = [n for n in (uncovered.last_seq, request.last_seq) if n is not None]
                uncovered = dataclasses.replace(uncovered, last_seq=max(known))
        chosen[request.vm_id] = (offset + 1, uncovered)
    return chosen


def _cover(tap: VmTap) -> int:
    """The VM's saved cover, while it holds: numbers that went back below it (a topic that
    retention emptied, a host that crashed before saving its last number) mean that the
    full sync it stands for may be gone with them."""
    covered_from = tap.state.resync_covered_from
    return covered_from if tap.last_seq_acked + 1 >= covered_from else 0


class ResyncRequestFollower:
    """Follows one site's status topic for the VMs of `taps` (see the module)."""

    def __init__(
        self,
        cluster: KafkaClusterSettings,
        site: str,
        taps: Mapping[str, VmTap],
        *,
        request_timeout_s: float,
        retry_s: float,
        failures: Counter,
    ) -> None:
        self._cluster = cluster
        self.site = site
        self._taps = taps
        self._request_timeout_ms = int(request_timeout_s * 1000)
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None
        self.topic = topic_name(Stream.STATUS)
        # Times following the topic or acting on a request failed (tried again after a
        # backoff), in all and since the last time the topic was read.
        self._failures = failures
        self._failures_in_a_row = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"resync-requests-{self.site}"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except KafkaError as exc:
                # The topic appears when a receiver, an applier (or the control plane)
                # creates it: not worth a warning until a few tries have failed.
                self._failed(
                    logging.WARNING if self._failures_in_a_row >= 2 else logging.DEBUG,
                    f"cannot read resync requests from {self.topic} ({self.site} site): {exc}",
                )
            except OSError as exc:  # a full sync's flag or a position could not be saved
                self._failed(logging.ERROR, f"cannot act on a resync request: {exc}")
            except Exception as exc:
                # A defect, not a state of the cluster: logged with its traceback, counted,
                # tried again after the backoff like the rest, rather than ending the task
                # (nothing would act on resync requests any more, silently).
                log.exception("resync requests (%s site) failed", self.site)
                self._failed(logging.ERROR, f"resync requests failed: {exc!r}")
            await asyncio.sleep(
                backoff_delay(self._retry_s, self._failures_in_a_row, maximum=_RETRY_MAX_S)
            )

    def _failed(self, level: int, message: str) -> None:
        self._failures.inc()
        self._failures_in_a_row += 1
        log.log(level, "%s (trying again)", message)

    async def _follow(self) -> None:
        partition = TopicPartition(self.topic, 0)
        consumer = Consumer(
            self._cluster,
            client_id=f"dm-tap-resync-requests-{self.site}",
            request_timeout_ms=self._request_timeout_ms,
            fetch_max_wait_ms=_FETCH_WAIT_MS,
            max_partition_fetch_bytes=1 << 20,
            fetch_max_bytes=1 << 20,
        )
        async with consumer:
            consumer.assign([partition])
            end = (await consumer.end_offsets([partition]))[partition]
            begin = (await consumer.beginning_offsets([partition]))[partition]
            offsets: dict[str, int] = {}
            for vm_id, tap in self._taps.items():
                saved = tap.state.resync_offset(self.site)
                if saved is None or saved > end:
                    # Never read there: from the end. Past the end: the topic was created
                    # again, and everything in it is new.
                    saved = end if saved is None else begin
                    await asyncio.to_thread(tap.state.save_resync_offset, self.site, saved)
                offsets[vm_id] = saved
            consumer.seek(partition, min(offsets.values(), default=end))
            self._failures_in_a_row = 0
            while True:
                fetched = await consumer.getmany(partition, timeout_ms=_FETCH_WAIT_MS * 2)
                records = [(r.offset, r.value) for r in fetched.get(partition, ())]
                if not records:
                    continue
                positions = {
                    vm_id: Position(offset, _cover(self._taps[vm_id]))
                    for vm_id, offset in offsets.items()
                }
                failed: OSError | None = None
                for vm_id, (after, request) in requests_to_act_on(records, positions).items():
                    tap = self._taps[vm_id]
                    try:
                        if request is not None:
                            covered_from = await self._act(tap, request)
                            await asyncio.to_thread(
                                tap.state.save_resync_covered_from, covered_from
                            )
                        await asyncio.to_thread(tap.state.save_resync_offset, self.site, after)
                    except OSError as exc:
                        # The other VMs first; this one's requests are read again from
                        # its saved offset after the backoff.
                        failed = failed or exc
                        continue
                    offsets[vm_id] = after
                if failed is not None:
                    raise failed

    async def _act(self, tap: VmTap, request: ResyncRequest) -> int:
        """Starts a full sync; the number from which it surely covers the VM: every record
        numbered from now on comes after the last one Kafka acknowledged (a new session
        continues after the topic's last record), and so does its RESYNC_START."""
        log.warning(
            "VM %s: a resync is asked for (%s: %s); starting a full sync",
            tap.vm_id,
            request.reason,
            request.detail,
        )
        if request.last_seq is not None:
            # After a regression the receiver drops what is numbered up to one past the
            # reused range (`last_seq` here): the full sync must be numbered after that.
            await tap.number_past(request.last_seq)
        covered_from = tap.last_seq_acked + 1
        await tap.request_full_sync()
        tap.stats.resync_requests += 1
        return covered_from
