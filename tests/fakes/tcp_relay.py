"""A TCP relay that a test can cut and restore, to make a database unreachable on demand."""

from __future__ import annotations

import asyncio
import threading

from tests.fakes.server import bound_socket


class TcpRelay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.loop = asyncio.new_event_loop()
        self._sock = bound_socket()
        self.port = self._sock.getsockname()[1]
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self._server = self.loop.run_until_complete(
                asyncio.start_server(self._handle, sock=self._sock)
            )
            started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update({writer, up_writer})

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `restore()`."""

        def do() -> None:
            self._cut = True
            for writer in list(self._writers):
                writer.transport.abort()

        self.loop.call_soon_threadsafe(do)

    def restore(self) -> None:
        def do() -> None:
            self._cut = False

        self.loop.call_soon_threadsafe(do)

    def stop(self) -> None:
        self.cut()

        async def close() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
