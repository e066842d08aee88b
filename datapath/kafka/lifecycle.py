"""What the producer, consumer and admin wrappers share about starting and stopping."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from datapath.kafka.errors import DRIVER_ERRORS, translate

log = logging.getLogger(__name__)


async def start_or_release(
    start: Callable[[], Awaitable[object]],
    release: Callable[[], Awaitable[object]],
    *,
    what: str,
    errors: tuple[type[BaseException], ...] = DRIVER_ERRORS,
) -> None:
    """Starts a driver client; when that fails, releases it and raises the translated start
    error (a failure to release is only logged: the start error is the one to report)."""
    try:
        await start()
    except errors as exc:
        try:
            await release()
        except errors as cleanup:
            log.debug("releasing a %s that failed to start: %s", what, cleanup)
        raise translate(exc) from exc


class AsyncClient:
    """`async with client:` starts it and stops it."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
