"""Background tasks owned by the object that starts them.

A service that works in the background (a writer flushing a queue, a LISTEN loop, a periodic
sweep) holds its tasks in a `Tasks` and closes it when the service closes: every task is
cancelled and awaited, so none outlives its owner and none is garbage-collected mid-run (the
event loop keeps only weak references to tasks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Tasks:
    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Runs `coroutine` until it returns or this closes; a finished task is forgotten."""
        task = asyncio.create_task(coroutine, name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def close(self) -> None:
        """Cancels every task and waits for each to end; what they raise is theirs to log."""
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._running)
