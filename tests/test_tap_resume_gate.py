"""When a session that overflowed takes writes again (vib.resume_gate): unit tests."""

from __future__ import annotations

from vib.resume_gate import MAX_PROBE_AFTER_S, PROBE_AFTER_S, RESUME_SHARE, ResumeGate

MB = 1_000_000


def test_a_guest_slower_than_the_drain_resumes_at_once() -> None:
    gate = ResumeGate()
    gate.paused(10.0, 1000 * MB, 5000 * MB, abandoned_bracket=False)
    # In 0.5 s Kafka took 100 MB (200 MB/s) and the guest wrote 25 MB (50 MB/s).
    assert gate.may_resume(10.5, 1100 * MB, 5025 * MB)
    assert gate.kafka_rate == 200 * MB
    assert gate.guest_rate == 50 * MB


def test_a_guest_faster_than_the_drain_waits_then_is_probed() -> None:
    gate = ResumeGate()
    gate.paused(10.0, 0, 0, abandoned_bracket=False)
    assert not gate.may_resume(10.5, 100 * MB, 150 * MB)  # 300 MB/s against 200
    assert not gate.may_resume(10.0 + 0.9 * PROBE_AFTER_S, 100 * MB, 400 * MB)
    assert gate.may_resume(10.0 + PROBE_AFTER_S, 100 * MB, 500 * MB)


def test_while_waiting_the_guest_is_sampled_against_the_rate_of_the_drain() -> None:
    gate = ResumeGate()
    gate.paused(0.0, 0, 0, abandoned_bracket=False)
    assert not gate.may_resume(0.5, 100 * MB, 150 * MB)
    # Drained long since: no more acknowledgements, and Kafka's rate stays what it was.
    gate.sample(0.6, 180 * MB)
    gate.sample(0.8, 180 * MB + int(0.2 * 250 * MB))  # 250 MB/s: still too fast
    assert not gate.may_resume(0.8, 100 * MB, 0)
    gate.sample(0.9, 230 * MB + int(0.1 * (RESUME_SHARE * 200 * MB - MB)))
    assert gate.kafka_rate == 200 * MB
    assert gate.may_resume(0.9, 100 * MB, 0)


def test_brackets_lost_in_a_row_double_the_probe_interval_until_a_resync_completes() -> None:
    gate = ResumeGate()
    intervals = []
    for _ in range(8):
        gate.paused(0.0, 0, 0, abandoned_bracket=True)
        intervals.append(gate.probe_after_s)
    assert intervals[:3] == [2 * PROBE_AFTER_S, 4 * PROBE_AFTER_S, 8 * PROBE_AFTER_S]
    assert intervals[-1] == MAX_PROBE_AFTER_S
    gate.resync_completed()
    gate.paused(0.0, 0, 0, abandoned_bracket=False)
    assert gate.probe_after_s == PROBE_AFTER_S
