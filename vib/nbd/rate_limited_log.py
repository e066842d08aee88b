"""A logger front that lets a burst of messages through, then counts what it drops.

A misbehaving or hostile client can trigger a protocol-violation message per request;
without a limit it would fill the disk with logs while everyone else is still served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """At most `burst` messages per `interval` seconds; the number suppressed is logged
    with the first message of the next interval."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 20,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._window_start = clock()
        self._emitted = 0
        self.suppressed = 0

    def log(
        self, level: int, msg: str, *args: object, exc_info: bool | BaseException = False
    ) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = self._clock()
        if now - self._window_start >= self._interval:
            if self.suppressed:
                self._logger.warning(
                    "%d similar messages suppressed in the last %.0f s",
                    self.suppressed,
                    now - self._window_start,
                )
            self._window_start = now
            self._emitted = 0
            self.suppressed = 0
        if self._emitted >= self._burst:
            self.suppressed += 1
            return
        self._emitted += 1
        self._logger.log(level, msg, *args, exc_info=exc_info)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(logging.INFO, msg, *args)

    def error(self, msg: str, *args: object, exc_info: bool | BaseException = False) -> None:
        self.log(logging.ERROR, msg, *args, exc_info=exc_info)
