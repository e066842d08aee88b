"""A service's stop waits for every one of its tasks, whatever each ended with, so that
what they used is closed after them (the tap's bitmaps flushed, the copiers closed)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from datapath.service import wait_ended


async def test_every_task_is_waited_for_and_only_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    finished: list[str] = []

    async def fails() -> None:
        raise RuntimeError("broken pipe of its own")

    async def slow(name: str) -> None:
        await asyncio.sleep(0.05)
        finished.append(name)

    async def forever() -> None:
        await asyncio.Event().wait()

    tasks = [
        asyncio.create_task(fails(), name="failing"),
        asyncio.create_task(slow("after-the-failure"), name="slow"),
        asyncio.create_task(forever(), name="cancelled"),
    ]
    tasks[2].cancel()
    with caplog.at_level(logging.ERROR, logger="datapath.service"):
        await wait_ended(tasks, "VM vm-1")
    assert all(task.done() for task in tasks)
    assert finished == ["after-the-failure"]
    assert [r.getMessage() for r in caplog.records] == [
        "VM vm-1: failing ended with RuntimeError('broken pipe of its own')"
    ]
