"""The HTTP client towards vendors (`proxy/upstream.py`) against a raw loopback server: what a
vendor's bytes become on their way back to the workload, and the HTTP/1.1 it speaks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from keybrake.proxy.upstream import Upstream, UpstreamError, UpstreamResponse

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


# The client's HTTP/1.1, against a scripted loopback vendor: each connection it accepts runs
# `script(reader, writer, requests)`, where `requests` collects the raw requests it read.

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


def ok(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Vendor:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.open_now = 0
        self.most_open = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.script(reader, writer, self.requests)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self, **settings: Any) -> AsyncIterator[tuple[Upstream, str]]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        options = {"timeout": 5.0, "connections": 4, "max_response_bytes": 1 << 20, **settings}
        upstream = Upstream(**options)
        await upstream.start()
        try:
            yield upstream, f"http://127.0.0.1:{port}"
        finally:
            await upstream.close()
            server.close()
            await server.wait_closed()


def keep_answering(answer: bytes) -> Script:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        while True:
            requests.append(await read_request(reader))
            writer.write(answer)
            await writer.drain()

    return script


def test_calls_reuse_a_kept_alive_connection_and_frame_requests_exactly() -> None:
    vendor = Vendor(keep_answering(ok(b'{"id": "pi_1"}')))

    async def scenario() -> list[UpstreamResponse]:
        async with vendor.running() as (upstream, base):
            first = await upstream.send(
                "POST", base + "/v1/payment_intents?expand[]=x", [("Stripe-Version", "1")], b"a=1"
            )
            second = await upstream.send("DELETE", base + "/v1/x", {}, None)
            third = await upstream.send("GET", base, {}, None)
            return [first, second, third]

    answers = asyncio.run(scenario())
    assert [a.body for a in answers] == [b'{"id": "pi_1"}'] * 3
    assert vendor.connections == 1
    post, delete, get = vendor.requests
    port = post.split(b"Host: 127.0.0.1:")[1].split(b"\r\n")[0]
    assert post == (
        b"POST /v1/payment_intents?expand[]=x HTTP/1.1\r\nHost: 127.0.0.1:%s\r\n"
        b"Content-Length: 3\r\nStripe-Version: 1\r\n\r\na=1" % port
    )
    assert delete.endswith(b"Content-Length: 0\r\n\r\n")  # a body-less DELETE says so
    assert get.startswith(b"GET / HTTP/1.1\r\n") and b"Content-Length" not in get


def test_chunked_and_connection_ending_answers_are_read_whole() -> None:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        requests.append(await read_request(reader))
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # an interim answer, then the real one
        writer.write(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n')
        await writer.drain()
        writer.write(b'5\r\n": 1}\r\n0\r\n\r\n')
        requests.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[1, 2]")
        await writer.drain()
        writer.close()

    vendor = Vendor(script)

    async def scenario() -> list[bytes]:
        async with vendor.running() as (upstream, base):
            first = await upstream.send("GET", base + "/a", {}, None)
            second = await upstream.send("GET", base + "/b", {}, None)
            third = await upstream.send("GET", base + "/c", {}, None)  # a new connection
            return [first.body, second.body, third.body]

    first, second, _ = asyncio.run(scenario())
    assert (first, second) == (b'{"a": 1}', b"[1, 2]")
    assert vendor.connections == 2  # the closed one was not used again


def test_a_connection_the_vendor_closed_while_idle_is_not_used_again() -> None:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        requests.append(await read_request(reader))
        writer.write(ok())  # kept alive, as far as the answer says, then closed at once
        await writer.drain()
        writer.close()

    vendor = Vendor(script)

    async def scenario() -> None:
        async with vendor.running() as (upstream, base):
            await upstream.send("POST", base + "/v1/x", {}, b"a=1")
            # The vendor's side is closed; wait until the client's idle connection has heard
            # it (its end of file), which is what keeps it from being used again.
            [idle] = [c for pool in upstream._idle.values() for c in pool]
            while not idle.closed:
                await asyncio.sleep(0)
            await upstream.send("POST", base + "/v1/x", {}, b"a=2")

    asyncio.run(scenario())
    assert vendor.connections == 2 and len(vendor.requests) == 2


def test_oversized_slow_and_broken_answers_are_upstream_errors_and_never_reused() -> None:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        while True:
            request = await read_request(reader)
            requests.append(request)
            if b"/big" in request:
                writer.write(ok(b"x" * 2048))
            elif b"/slow" in request:
                await asyncio.sleep(60)
            elif b"/garbage" in request:
                writer.write(b"HTTP/1.1 abc\r\n\r\n")
            elif b"/cut" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(ok())
            await writer.drain()

    vendor = Vendor(script)

    async def scenario() -> list[str]:
        reasons = []
        async with vendor.running(max_response_bytes=1024, timeout=0.5) as (upstream, base):
            for path in ("/big", "/slow", "/garbage", "/cut"):
                with pytest.raises(UpstreamError) as caught:
                    await upstream.send("GET", base + path, {}, None)
                reasons.append(str(caught.value))
                await upstream.send("GET", base + "/fine", {}, None)  # works, on a new one
        return reasons

    reasons = asyncio.run(scenario())
    assert reasons[0] == "the vendor's response exceeds the size limit"
    assert reasons[1] == "the vendor did not answer in time"
    assert reasons[2].startswith("connection to the vendor failed: an unreadable answer")
    assert reasons[3] == "connection to the vendor failed: the connection was closed"
    assert vendor.connections == 5  # one for each failure, then the /fine after each reused


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Note", "a\r\nAuthorization: Bearer sk_live_other")],
        [("X-Note", "a\nb")],
        [("Bad Name", "x")],
        [("X-Note", "\u20ac")],
    ],
)
def test_a_header_that_would_split_the_request_sends_nothing(
    headers: list[tuple[str, str]],
) -> None:
    vendor = Vendor(keep_answering(ok()))

    async def scenario() -> None:
        async with vendor.running() as (upstream, base):
            with pytest.raises(UpstreamError, match="cannot be written"):
                await upstream.send("POST", base + "/v1/x", headers, b"a=1")

    asyncio.run(scenario())
    assert vendor.connections == 0


def test_head_gzip_and_unknown_encodings() -> None:
    packed = gzip.compress(b'{"id": "pi_1"}')

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        while True:
            request = await read_request(reader)
            requests.append(request)
            if request.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
            elif b"/gzip" in request:
                writer.write(ok(packed, b"Content-Encoding: gzip\r\n"))
            else:
                writer.write(ok(b"??", b"Content-Encoding: br\r\n"))
            await writer.drain()

    vendor = Vendor(script)

    async def scenario() -> tuple[UpstreamResponse, UpstreamResponse]:
        async with vendor.running() as (upstream, base):
            head = await upstream.send("HEAD", base + "/h", {}, None)
            unpacked = await upstream.send("GET", base + "/gzip", {}, None)
            with pytest.raises(UpstreamError, match="unknown content encoding"):
                await upstream.send("GET", base + "/br", {}, None)
            return head, unpacked

    head, unpacked = asyncio.run(scenario())
    assert head.status == 200 and head.body == b""
    assert unpacked.body == b'{"id": "pi_1"}'
    assert "content-encoding" not in {k.lower() for k, _ in unpacked.headers}


def test_the_pool_bounds_connections_and_queues_the_rest() -> None:
    release = asyncio.Event()

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        while True:
            requests.append(await read_request(reader))
            await release.wait()
            writer.write(ok())
            await writer.drain()

    vendor = Vendor(script)

    async def scenario() -> list[int]:
        async with vendor.running(connections=2) as (upstream, base):
            calls = [
                asyncio.ensure_future(upstream.send("GET", base + "/x", {}, None)) for _ in range(6)
            ]
            while len(vendor.requests) < 2:
                await asyncio.sleep(0)
            for _ in range(5):
                await asyncio.sleep(0)
            assert len(vendor.requests) == 2  # the other four wait for a connection
            release.set()
            return [answer.status for answer in await asyncio.gather(*calls)]

    assert asyncio.run(scenario()) == [200] * 6
    assert vendor.most_open == 2 and len(vendor.requests) == 6


def test_a_connect_proxy_gets_its_credentials_and_its_refusal_is_an_upstream_error() -> None:
    """The tunnel itself (TLS through a relaying proxy) is tests/test_egress.py's; here, what the
    client asks of the proxy, and a proxy that says no."""

    async def proxy(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    corporate = Vendor(proxy)

    async def scenario() -> str:
        async with corporate.running() as (_, proxy_url):
            credentials = proxy_url.replace("http://", "http://team%40corp:s%3Acret@")
            upstream = Upstream(
                timeout=5, connections=1, max_response_bytes=1024, proxy=credentials
            )
            await upstream.start()
            try:
                with pytest.raises(UpstreamError) as caught:
                    await upstream.send("POST", "https://api.stripe.test/v1/x", {}, b"a=1")
            finally:
                await upstream.close()
            return str(caught.value)

    reason = asyncio.run(scenario())
    assert reason == "connection to the vendor failed: the CONNECT proxy answered 407"
    [asked] = corporate.requests
    secret = base64.b64encode(b"team@corp:s:cret").decode()
    assert asked == (
        b"CONNECT api.stripe.test:443 HTTP/1.1\r\nHost: api.stripe.test:443\r\n"
        b"Proxy-Authorization: Basic %s\r\n\r\n" % secret.encode()
    )
