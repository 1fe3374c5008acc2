"""Reading a request's body: whole, within a size limit and a deadline, the one way every
endpoint does (vendor calls, the admin API, the dashboard's forms)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive

__all__ = ["BodyDeadlines"]


class BodyDeadlines:
    """Request bodies must arrive in full within `timeout` seconds of the request's start: a
    deadline, not an idle timeout, so a client trickling a byte at a time is cut off too.

    One watchdog task checks every reader a few times per timeout and cancels those past their
    deadline, instead of a timer per request (which cost several microseconds on every call)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._readers: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 4))  # a check period
            now = loop.time()
            for task, deadline in list(self._readers.items()):
                if deadline <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    async def read(self, receive: Receive, limit: int) -> tuple[bytes, bool, bool]:
        """(body, too large, timed out)."""
        task = asyncio.current_task()
        assert task is not None
        self._readers[task] = asyncio.get_running_loop().time() + self.timeout
        try:
            return (*await _read_body(receive, limit), False)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # a cancellation of someone else's: pass it on
            task.uncancel()
            return b"", False, True
        finally:
            del self._readers[task]
            self._expired.discard(task)

    async def read_whole(self, receive: Receive, limit: int) -> bytes | None:
        """The body; None when it is larger than `limit`. Raises TimeoutError when it did not
        arrive within the deadline."""
        body, too_large, timed_out = await self.read(receive, limit)
        if timed_out:
            raise TimeoutError(f"the request body did not arrive within {self.timeout:g}s")
        return None if too_large else body


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    too_large = False
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            too_large = True
        elif chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return (b"" if too_large else b"".join(chunks)), too_large
