"""Transceiver parts without a broker: the throttle's arithmetic and the progress record."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from services.transceiver import throttle as throttle_module
from services.transceiver.offset_record import (
    CopyProgress,
    OffsetRecordError,
    decode_progress,
    encode_progress,
    progress_key,
)
from services.transceiver.settings import TransceiverSettings
from services.transceiver.throttle import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(throttle_module.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(throttle_module.asyncio, "sleep", fake.sleep)
    return fake


async def test_throttle_holds_the_long_run_rate_whatever_the_message_sizes(
    clock: FakeClock,
) -> None:
    bucket = TokenBucket(1_000_000, burst_bytes=100_000)
    start = clock.now
    sizes = [30_000, 250_000, 1_000, 700_000, 19_000] * 4  # some larger than the burst
    for size in sizes:
        await bucket.acquire(size)
    elapsed = clock.now - start
    # Everything beyond the initial burst is paid for at exactly the rate.
    assert elapsed == pytest.approx((sum(sizes) - 100_000) / 1_000_000)
    assert bucket.waited_s == pytest.approx(elapsed)


async def test_throttle_lets_a_burst_through_without_waiting(clock: FakeClock) -> None:
    bucket = TokenBucket(1_000, burst_bytes=5_000)
    for _ in range(5):
        assert await bucket.acquire(1_000) == 0.0
    assert clock.slept == []
    assert await bucket.acquire(1_000) == pytest.approx(1.0)


async def test_throttle_serves_concurrent_callers_in_arrival_order(clock: FakeClock) -> None:
    bucket = TokenBucket(100, burst_bytes=100)
    order: list[int] = []

    async def take(n: int) -> None:
        await bucket.acquire(100)
        order.append(n)

    await asyncio.gather(*(take(n) for n in range(5)))
    assert order == list(range(5))


def test_progress_record_round_trips_and_rejects_foreign_values() -> None:
    progress = CopyProgress("dm.batch.vm1", 0, 42, 4100, 3, "src:9092", 123, "Zx3s9Q")
    assert decode_progress(encode_progress(progress)) == progress
    # A record of an earlier version, without the source topic's id, still reads.
    earlier = encode_progress(progress).replace(b',"source_topic_id":"Zx3s9Q"', b"")
    assert decode_progress(earlier) == dataclasses.replace(progress, source_topic_id=None)
    assert progress_key("dm.batch.vm1", 0) == b"transceiver/dm.batch.vm1/0"
    for bad in (b"", b"{}", b"[1]", b'{"schema": 99}', b"\xff"):
        with pytest.raises(OffsetRecordError):
            decode_progress(bad)


def test_settings_refuse_a_burst_without_a_rate(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="burst_bytes needs"):
        TransceiverSettings(plan="p.yaml", burst_bytes=10)  # type: ignore[arg-type]


def test_settings_read_cluster_overrides_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DM_TRANSCEIVER_TARGET_KAFKA__BOOTSTRAP_SERVERS", "wan-gw:9093")
    monkeypatch.setenv("DM_TRANSCEIVER_TARGET_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("DM_TRANSCEIVER_TARGET_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("DM_TRANSCEIVER_TARGET_KAFKA__SASL_USERNAME", "dm")
    monkeypatch.setenv("DM_TRANSCEIVER_TARGET_KAFKA__SASL_PASSWORD", "s3cret")
    settings = TransceiverSettings(plan="p.yaml")  # type: ignore[arg-type]
    assert settings.target_kafka is not None
    assert settings.target_kafka.bootstrap_servers == "wan-gw:9093"
    assert "s3cret" not in settings.model_dump_json()
    assert settings.target_kafka.client_kwargs()["sasl_plain_password"] == "s3cret"
