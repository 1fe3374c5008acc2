"""Run an aiohttp application on a loopback port in a background thread, for tests."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bound_socket() -> socket.socket:
    """A listening loopback socket on a free port, to hand to a server process (no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class ThreadedServer:
    """An aiohttp app served from its own event loop thread."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._sock = bound_socket()
        self._ssl = ssl_context
        self.port = self._sock.getsockname()[1]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._start())
            started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.SockSite(self._runner, self._sock, ssl_context=self._ssl)
        await site.start()

    def call(self, fn: Callable[[], Any]) -> None:
        """Run fn on the server's loop (e.g. to set an asyncio.Event)."""
        self.loop.call_soon_threadsafe(fn)

    def event(self, is_set: bool = True) -> asyncio.Event:
        """An asyncio.Event of the server's loop."""

        async def make() -> asyncio.Event:
            made = asyncio.Event()
            if is_set:
                made.set()
            return made

        return asyncio.run_coroutine_threadsafe(make(), self.loop).result()

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class GatedServer(ThreadedServer):
    """A server whose requests can be held at a gate: `hold()`, then `arrived` is set when one
    is waiting there, and `release()` lets every request through. `answered` is set whenever a
    request has been handled (answered, or its client already gone)."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.arrived = threading.Event()
        self.answered = threading.Event()

        @web.middleware
        async def mark_answered(request: web.Request, handler: Any) -> web.StreamResponse:
            try:
                return await handler(request)  # type: ignore[no-any-return]
            finally:
                self.answered.set()

        app.middlewares.append(mark_answered)
        super().__init__(app, ssl_context)
        self.gate = self.event()

    def hold(self) -> None:
        self.call(self.gate.clear)

    def release(self) -> None:
        self.call(self.gate.set)

    async def at_gate(self) -> None:
        self.arrived.set()
        await self.gate.wait()
