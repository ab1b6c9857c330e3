"""A thread that handles queued items in batches: whatever is waiting when it is free, in one call."""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from collections.abc import Callable


def resolve(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if future.done():  # cancelled: the client is gone
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def send(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value=None, error: BaseException | None = None):
    """Hand a result to a request's event loop from a worker thread."""
    try:
        loop.call_soon_threadsafe(resolve, future, value, error)
    except RuntimeError:  # the loop has closed: the server is shutting down, nobody waits
        pass


class Gather:
    """`handle(items) -> results` runs in one thread on every item waiting when it gets free (up to max_batch); a
    result may be an exception, that item's own error.

    The decision layer's first look (route, rules, answerability) embeds questions: one call for 8 questions
    costs little more than for one, and requests that arrive while a call runs join the next call."""

    def __init__(self, handle: Callable[[list], list], max_batch: int = 32, name: str = "mlx-lora-gather"):
        self.handle, self.max_batch = handle, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.sizes: list[int] = []
        self.in_flight = 0  # items queued or being handled (an int's += is atomic enough for a hint)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    async def __call__(self, item):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.in_flight += 1
        self.queue.put((item, loop, future))
        return await future

    def stop(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        while (first := self.queue.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            try:
                self._handle([entry for entry in batch if not entry[2].cancelled()])
            finally:
                self.in_flight -= len(batch)

    def _handle(self, live: list) -> None:
        if not live:
            return
        self.sizes.append(len(live))
        try:
            results = self.handle([item for item, _, _ in live])
        except Exception as exc:  # each waiting request gets the error; the thread stays up
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            for _, loop, future in live:
                send(loop, future, None, exc)
            return
        for (_, loop, future), result in zip(live, results):  # a result may be one item's own error
            if isinstance(result, BaseException):
                send(loop, future, None, result)
            else:
                send(loop, future, result)
