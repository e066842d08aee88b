"""Bounding a Kafka transaction in time, abort included.

``asyncio.timeout`` cancels once; a transaction cancelled that way then awaits its abort,
which waits for the broker again, so a cluster that is gone keeps it hanging. ``within``
cancels until the work has really stopped. The receiver and the transceiver bound their
transactions (and the transceiver its producer's close) with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_CANCEL_GRACE_S = 1.0


async def within(timeout_s: float, work: Coroutine[Any, Any, T]) -> T:
    """The result of ``work``, or TimeoutError after ``timeout_s`` with ``work`` stopped."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        await _stop(task)
        raise
    if task in done:
        return task.result()
    await _stop(task)
    raise TimeoutError(f"no result within {timeout_s:.1f}s")


async def _stop(task: asyncio.Future[Any]) -> None:
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_CANCEL_GRACE_S)
    if not task.cancelled():
        task.exception()  # retrieved: a failure after the deadline is not worth a warning
