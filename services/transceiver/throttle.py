"""A token bucket that holds a gateway pair's WAN traffic to a byte rate."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Bytes per second with a burst allowance, shared by every copy task of one pair.

    ``acquire(n)`` takes ``n`` tokens and waits until the bucket is no longer in debt. A
    request larger than the burst is allowed (a Kafka message cannot be split) and paid
    for by waiting longer, so the long-run rate holds whatever the message sizes.
    """

    def __init__(self, rate_bytes_per_s: float, *, burst_bytes: float | None = None) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError(f"rate must be positive, got {rate_bytes_per_s}")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes if burst_bytes is not None else rate_bytes_per_s)
        if self.burst <= 0:
            raise ValueError(f"burst must be positive, got {self.burst}")
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, amount: int) -> float:
        """Takes ``amount`` bytes' worth of tokens; returns the seconds waited."""
        if amount <= 0:
            return 0.0
        # The lock makes callers pay in arrival order: no task starves another.
        async with self._lock:
            self._refill()
            self._tokens -= amount
            if self._tokens >= 0:
                return 0.0
            wait = -self._tokens / self.rate
            await asyncio.sleep(wait)
            self.waited_s += wait
            return wait
