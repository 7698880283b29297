"""Wake held check-ins the moment the aggregator applies a transition.

The aggregator signals transitions on a `threading.Condition`
(`Aggregator.wait_for_change`), from whichever thread applied them. One
thread per application waits on it and hands each change to the event loop,
where every held long-poll awaits an `asyncio.Event`: a round that closes
reaches the waiting clients within a loop iteration, and a thousand held
requests cost one waiting thread, not a thousand pollers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from aggregator import Aggregator

__all__ = ["ChangeFeed"]

# How long the watcher thread waits on the condition before it compares the
# generation again: bounds the delay of a change signalled between its
# compare and its wait, and how long `stop` takes.
_WATCH_S = 0.05


class ChangeFeed:
    """Lets coroutines await the aggregator's next transition."""

    def __init__(self, aggregator: Aggregator, loop: asyncio.AbstractEventLoop) -> None:
        self._aggregator = aggregator
        self._loop = loop
        self._event = asyncio.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedcore-changes", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; held waiters fall back to their timeouts."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5 * _WATCH_S + 1.0)

    async def wait(self, seen: int, timeout_s: float) -> None:
        """Return once `aggregator.generation` differs from `seen`, or after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._aggregator.generation == seen:
                    # Read and awaited in one loop step: `_fire` runs on this
                    # loop too, so it cannot slip in between.
                    await self._event.wait()

    def _watch(self) -> None:
        seen = self._aggregator.generation
        while not self._stop.is_set():
            self._aggregator.wait_for_change(_WATCH_S)
            now = self._aggregator.generation
            if now != seen:
                seen = now
                with contextlib.suppress(RuntimeError):  # the loop already closed
                    self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()
