"""What a request gives back: token events as they are produced, readable from any thread or from asyncio.

The scheduler thread `put`s events; a consumer takes them with `get(timeout)` (blocking, any thread) or
`await aget()` (an asyncio loop: the scheduler wakes the loop with `call_soon_threadsafe`, no thread per waiter).
A stream ends after the event whose `finish_reason` is set; an engine failure is delivered as an exception that
`get`/`aget` raise.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import threading
import time
from typing import Any

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclasses.dataclass
class TokenEvent:
    """One generated token. `text` is the text it releases ("" while a stop string may still match, or without a
    tokenizer); `finish_reason` ("stop" | "length" | "cancelled") is set on a request's last event."""

    index: int
    token_id: int
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclasses.dataclass
class RequestOutput:
    """A finished request: prompt and output ids, text, logprobs, why it stopped, and its timings (seconds)."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str
    ttft_s: float | None
    e2e_s: float
    token_times: list[float]  # perf_counter() of each token's release

    @property
    def inter_token_s(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


class RequestStream:
    """A thread-safe queue of `TokenEvent`s with blocking and asyncio readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: collections.deque[TokenEvent | BaseException] = collections.deque()
        self._ended = False  # the final event (or an exception) was put
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def ended(self) -> bool:
        return self._ended

    def put(self, item: TokenEvent | BaseException) -> None:
        with self._cond:
            if self._ended:
                return
            self._items.append(item)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                self._ended = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass

    def _pop(self) -> TokenEvent | None:
        if self._items:
            item = self._items.popleft()
            if isinstance(item, BaseException):
                self._items.appendleft(item)  # every later read raises too
                raise item
            return item
        return None

    def get(self, timeout: float | None = None) -> TokenEvent | None:
        """The next event; None at the end of the stream. Raises `TimeoutError` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items and not self._ended:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("no token within the timeout")
                self._cond.wait(left)
            return self._pop()

    async def aget(self) -> TokenEvent | None:
        """The next event from an asyncio task; None at the end of the stream."""
        while True:
            with self._cond:
                if self._items or self._ended:
                    return self._pop()
                loop = asyncio.get_running_loop()
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            await fut


def _wake(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)
