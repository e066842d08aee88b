"""When a session that overflowed takes writes again.

After an overflow (policy `track`) the session drains what it holds while guest writes
mark the bitmap. Taking writes again opens a resync bracket, and a bracket completes only
if Kafka takes both the live writes and the resync's data. While the guest writes faster
than Kafka acknowledged during the drain, a bracket would overflow in turn and be
abandoned: its records (live writes and resync data) sent for nothing, to be sent again
by the next bracket, and the guest slowed by the sending. So the session takes writes
again once it holds at most half the buffer *and* the guest writes less than
`RESUME_SHARE` of what Kafka acknowledged per second during the drain.

A drain measures Kafka at one moment (a broker's pause, a busy machine), so a guest
held back this way is tried again anyway after `PROBE_AFTER_S`, doubled for every
bracket in a row that such a try lost to an overflow (up to `MAX_PROBE_AFTER_S`), and
reset by a resync that completes: a guest that Kafka can follow is never tracked for
long, and one that outruns it costs one abandoned bracket per interval.
"""

from __future__ import annotations

# Of Kafka's measured rate, what the guest's may be for live writes to leave room for
# the resync (and for the measurement's noise).
RESUME_SHARE = 0.9
PROBE_AFTER_S = 1.0
MAX_PROBE_AFTER_S = 30.0


class ResumeGate:
    """The guest's write rate against Kafka's, both measured over the drain after each
    overflow; while the guest is held back, its rate is sampled by the tap's housekeeping."""

    def __init__(self) -> None:
        self.guest_rate = 0.0
        self.kafka_rate: float | None = None
        self._sampled_at: float | None = None
        self._sampled_bytes = 0
        self._paused_at = 0.0
        self._acked_at_pause = 0
        self._written_at_pause = 0
        self._lost_brackets = 0

    def sample(self, now: float, written: int) -> None:
        """The guest's bytes written so far; the rate is over the time since the last call."""
        if self._sampled_at is not None and now > self._sampled_at:
            self.guest_rate = (written - self._sampled_bytes) / (now - self._sampled_at)
        self._sampled_at, self._sampled_bytes = now, written

    def paused(self, now: float, acked: int, written: int, *, abandoned_bracket: bool) -> None:
        """An overflow, with the bytes Kafka acknowledged and the guest wrote so far."""
        self._paused_at, self.kafka_rate = now, None
        self._acked_at_pause, self._written_at_pause = acked, written
        if abandoned_bracket:
            self._lost_brackets += 1

    def resync_completed(self) -> None:
        self._lost_brackets = 0

    @property
    def probe_after_s(self) -> float:
        return min(MAX_PROBE_AFTER_S, PROBE_AFTER_S * float(1 << min(self._lost_brackets, 16)))

    def may_resume(self, now: float, acked: int, written: int) -> bool:
        """Called once the session holds at most half the buffer: the first call measures
        both rates over the drain; True if the guest writes less than its share."""
        if self.kafka_rate is None:
            elapsed = now - self._paused_at
            if elapsed <= 0:
                self.kafka_rate = float("inf")
            else:
                self.kafka_rate = (acked - self._acked_at_pause) / elapsed
                self.guest_rate = (written - self._written_at_pause) / elapsed
        if self.guest_rate < RESUME_SHARE * self.kafka_rate:
            return True
        return now - self._paused_at >= self.probe_after_s
