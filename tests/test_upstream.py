"""The HTTP client towards vendors (`proxy/upstream.py`) against a raw loopback server: what a
vendor's bytes become on their way back to the workload."""

from __future__ import annotations

import asyncio

from keybrake.proxy.upstream import Upstream

# A header value that is not UTF-8 (a lone \xe9), and one that is (€): both are bytes a vendor
# may send, and both must reach the workload as they came.
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"X-Note: caf\xe9\r\nX-Price: 5 \xe2\x82\xac\r\nRequest-Id: req_1\r\n\r\n{}"
)


def test_vendor_header_bytes_are_relayed_as_they_came() -> None:
    """aiohttp read header values as UTF-8 (a lone \\xe9 became a surrogate, € a character
    outside latin-1), which the server then could not write: a 500 after the call had settled,
    and again on every replay of its stored answer."""

    async def scenario() -> list[tuple[str, str]]:
        async def vendor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ANSWER)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(vendor, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream(timeout=5, connections=1, max_response_bytes=1 << 20)
        await upstream.start()
        try:
            answer = await upstream.send("GET", f"http://127.0.0.1:{port}/v1/x", {}, None)
        finally:
            await upstream.close()
            server.close()
            await server.wait_closed()
        return answer.headers

    headers = dict(asyncio.run(scenario()))
    assert headers["X-Note"].encode("latin-1") == b"caf\xe9"
    assert headers["X-Price"].encode("latin-1") == b"5 \xe2\x82\xac"
    assert headers["Request-Id"] == "req_1"
