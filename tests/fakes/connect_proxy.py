"""A forward proxy of the kind corporate networks put in front of the internet: it takes
`CONNECT host:port HTTP/1.1`, opens a TCP connection there, answers `200 Connection
established`, and copies bytes both ways (RFC 9110, section 9.3.6). It records every CONNECT
target and every byte it relayed, so a test can prove a call went through it and that what it
saw was TLS, not the request. Anything but CONNECT gets `405`: it never reads a plaintext
request it could log.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.fakes.server import bound_socket


class ConnectProxy:
    def __init__(self) -> None:
        self.targets: list[str] = []
        self.refused: list[str] = []
        self.relayed = bytearray()  # everything that crossed the tunnels, both ways
        self._lock = threading.Lock()
        self._sock = bound_socket()
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self._server = self.loop.run_until_complete(
                asyncio.start_server(self._client, sock=self._sock)
            )
            started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method != "CONNECT":
                with self._lock:
                    self.refused.append(f"{method} {target}")
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            host, port = target.rsplit(":", 1)
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            with self._lock:
                self.targets.append(target)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                with self._lock:
                    self.relayed += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
