"""Run a coroutine inline until it first suspends.

Most export calls (a pwrite into the page cache) finish without ever awaiting. Wrapping
each in a Task would cost a scheduling round trip per request; instead the server steps
the coroutine itself and only hands it to a Task when it really suspends. Python 3.12's
eager task factory does the same; this works on 3.11.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any


class Suspended:
    """A coroutine that suspended on its first step: `resume()` finishes it (await that
    inside a Task)."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def resume(self) -> Awaitable[Any]:
        return _resume(self._coro, self._yielded)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    # Pass each future the coroutine yields up to the enclosing Task, and whatever the
    # Task sends or throws (a result, a cancellation) back down, exactly as `await` would.
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation and the like belong to the coroutine
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value
