"""The HTTP client towards vendors (`proxy/upstream.py`) against a raw loopback server: what a
vendor's bytes become on their way back to the workload, and the HTTP/1.1 it speaks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from keybrake.proxy.upstream import Upstream, UpstreamError, UpstreamResponse
from tests.fakes.pki import CertificateAuthority


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def each_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each scenario on asyncio's loop and on uvloop's (`keybrake serve --loop uvloop`), whose
    transports differ in when they close and what they raise."""
    policy = asyncio.get_event_loop_policy()
    if request.param == "uvloop":
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(policy)


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


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Let the loop run until `condition` holds; a regression fails here instead of spinning."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "waited in vain"
        await asyncio.sleep(0)


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


def keep_answering(answer: bytes, gate: asyncio.Event | None = None) -> Script:
    """A vendor answering every request with `answer`, each only once `gate` (if any) is set."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        while True:
            requests.append(await read_request(reader))
            if gate is not None:
                await gate.wait()
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


def test_an_answer_with_an_identity_transfer_encoding_ends_where_its_connection_does() -> None:
    """Neither a length nor chunked: read to the end of the connection (it was taken for a
    framed answer, so the close was an error, and the call an unknown outcome)."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        requests.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n[3]")
        await writer.drain()
        writer.close()

    vendor = Vendor(script)

    async def scenario() -> bytes:
        async with vendor.running() as (upstream, base):
            return (await upstream.send("GET", base + "/a", {}, None)).body

    assert asyncio.run(scenario()) == b"[3]"


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
            await until(lambda: idle.closed)
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
    vendor = Vendor(keep_answering(ok(), release))

    async def scenario() -> list[int]:
        async with vendor.running(connections=2) as (upstream, base):
            calls = [
                asyncio.ensure_future(upstream.send("GET", base + "/x", {}, None)) for _ in range(6)
            ]
            await until(lambda: len(vendor.requests) >= 2)
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


# Review findings: what a vendor's bytes must never do to a call, each first shown failing.


def pooled(upstream: Upstream) -> list[Any]:
    return [connection for idle in upstream._idle.values() for connection in idle]


def test_bytes_after_an_answer_are_never_read_as_the_next_calls_answer() -> None:
    """A vendor that writes more than the answer, in the same packet: the start of another one.
    llhttp reads on into it, and the next call on that connection was handed the stray answer
    with the first bytes of its own for a body: another answer priced and settled as its own."""
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n"

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        while True:
            request = await read_request(reader)
            requests.append(request)
            if b"/first" in request:
                writer.write(ok(b'{"id": "pi_first"}') + stray)  # one write: one read
            else:
                writer.write(ok(b'{"id": "pi_second"}'))
            await writer.drain()

    vendor = Vendor(script)

    async def scenario() -> list[UpstreamResponse]:
        async with vendor.running() as (upstream, base):
            first = await upstream.send("POST", base + "/first", {}, b"a=1")
            second = await upstream.send("POST", base + "/second", {}, b"a=2")
            return [first, second]

    first, second = asyncio.run(scenario())
    assert (first.body, second.body) == (b'{"id": "pi_first"}', b'{"id": "pi_second"}')
    assert vendor.connections == 2  # the one with the stray bytes was not used again


def test_interim_answers_are_never_final_and_a_switch_of_protocols_is_an_upstream_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A `100 Continue` and then a closed connection was handed over as the answer (status 100,
    no body), as was a HEAD's interim answer; a `101` (never asked for) was handed over too,
    while httptools' HttpParserUpgrade (not an HttpParserError) escaped into the loop."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        request = await read_request(reader)
        requests.append(request)
        if b"/continue-then-close" in request:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            return  # closed
        if request.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        else:
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n\x81\x00"
            )
        await writer.drain()
        await reader.read()

    vendor = Vendor(script)

    async def scenario() -> tuple[list[str], UpstreamResponse]:
        reasons = []
        async with vendor.running() as (upstream, base):
            for path in ("/continue-then-close", "/switch"):
                with pytest.raises(UpstreamError) as caught:
                    await upstream.send("POST", base + path, {}, b"a=1")
                reasons.append(str(caught.value))
            head = await upstream.send("HEAD", base + "/h", {}, None)
        return reasons, head

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        reasons, head = asyncio.run(scenario())
    assert reasons == [
        "connection to the vendor failed: the connection was closed",
        "connection to the vendor failed: it answered 101 Switching Protocols",
    ]
    assert (head.status, head.body) == (200, b"")
    assert not [r for r in caplog.records if "data_received" in r.getMessage()]


def test_an_endless_answer_head_is_cut_off_at_the_head_limit() -> None:
    """llhttp sets no limit on a header's size (httptools gathers a value's pieces itself):
    a vendor streaming one header forever grew the proxy's memory until the timeout, where
    aiohttp stopped at 8 KiB."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        requests.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nX-Padding: ")
        while True:
            writer.write(b"a" * 65536)
            await writer.drain()

    vendor = Vendor(script)

    async def scenario() -> str:
        async with vendor.running(timeout=5.0) as (upstream, base):
            with pytest.raises(UpstreamError) as caught:
                await upstream.send("GET", base + "/x", {}, None)
        return str(caught.value)

    assert asyncio.run(scenario()) == "the vendor's response head exceeds the size limit"


def test_a_chunked_answers_trailer_is_not_relayed_nor_read_as_its_headers() -> None:
    """A trailer came back as a header of the answer, after its body: relayed to the workload,
    read for the request id, and a trailing Content-Encoding made the body undecodable."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nRequest-Id: req_1\r\n\r\n"
        b"2\r\n{}\r\n0\r\nRequest-Id: req_forged\r\nContent-Encoding: gzip\r\n\r\n"
    )
    vendor = Vendor(keep_answering(chunked))

    async def scenario() -> UpstreamResponse:
        async with vendor.running() as (upstream, base):
            return await upstream.send("GET", base + "/x", {}, None)

    answer = asyncio.run(scenario())
    assert (answer.body, answer.headers) == (b"{}", [("Request-Id", "req_1")])


def test_close_leaves_no_connection_open_behind_a_call_in_flight() -> None:
    """A call still waiting for its answer when the client closed put its connection back in
    the pool afterwards, open for good; a call after close failed with an AssertionError."""
    release = asyncio.Event()
    vendor = Vendor(keep_answering(ok(), release))

    async def scenario() -> None:
        async with vendor.running() as (upstream, base):
            call = asyncio.ensure_future(upstream.send("GET", base + "/x", {}, None))
            await until(lambda: bool(vendor.requests))
            await upstream.close()
            release.set()
            assert (await call).status == 200  # its answer still comes
            assert pooled(upstream) == []
            with pytest.raises(UpstreamError, match="not running"):
                await upstream.send("GET", base + "/x", {}, None)

    asyncio.run(scenario())
    assert len(vendor.requests) == 1


def test_a_connection_the_loop_is_closing_is_not_taken_from_the_pool() -> None:
    """A kept-alive connection whose transport the loop has closed (a reset read while idle)
    but whose connection_lost has not run yet: a call that took it wrote into nothing and
    failed, counted as spent, though it never left."""
    vendor = Vendor(keep_answering(ok()))

    async def scenario() -> int:
        async with vendor.running() as (upstream, base):
            await upstream.send("POST", base + "/v1/x", {}, b"a=1")
            [idle] = pooled(upstream)
            idle.transport.abort()  # as the loop does on a read error; connection_lost follows
            return (await upstream.send("POST", base + "/v1/x", {}, b"a=2")).status

    assert asyncio.run(scenario()) == 200
    assert vendor.connections == 2 and len(vendor.requests) == 2


def test_a_cut_compressed_answer_is_an_upstream_error() -> None:
    """A gzip answer cut short inflates to the start of its JSON without a zlib error: it was
    handed over as the whole answer. An empty one (a HEAD's) has nothing to inflate."""
    packed = gzip.compress(b'{"id": "pi_1", "amount": 700, "currency": "usd"}')

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        while True:
            request = await read_request(reader)
            requests.append(request)
            if request.startswith(b"HEAD"):
                length = b"Content-Length: %d\r\n" % len(packed)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n%s\r\n" % length)
            else:
                writer.write(ok(packed[:-12], b"Content-Encoding: gzip\r\n"))
            await writer.drain()

    vendor = Vendor(script)

    async def scenario() -> UpstreamResponse:
        async with vendor.running() as (upstream, base):
            with pytest.raises(UpstreamError, match="could not be read"):
                await upstream.send("GET", base + "/x", {}, None)
            return await upstream.send("HEAD", base + "/x", {}, None)

    head = asyncio.run(scenario())
    assert (head.status, head.body) == (200, b"")


def test_an_answer_cut_by_a_reset_is_not_taken_for_a_whole_one() -> None:
    """An answer without a length ends where the connection does, when the vendor closes it;
    one the connection's reset cut off was handed over as if whole."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        requests.append(await read_request(reader))
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"id": "pi_')
        await writer.drain()
        for _ in range(10):  # the client reads what came so far
            await asyncio.sleep(0)
        linger = struct.pack("ii", 1, 0)  # closed with a reset (RST), not an end of file
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()

    vendor = Vendor(script)

    async def scenario() -> None:
        async with vendor.running() as (upstream, base):
            with pytest.raises(UpstreamError, match="connection was closed"):
                await upstream.send("GET", base + "/x", {}, None)

    asyncio.run(scenario())


@pytest.mark.parametrize("shape", ["https://team:s3cret@{}", "{}"])
def test_a_proxy_that_is_not_http_is_refused_before_anything_is_sent(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY=https://user:password@proxy:443 got a plaintext CONNECT, its password in
    the clear, on the port where the proxy speaks TLS; one without a scheme was a gaierror."""
    corporate = Vendor(keep_answering(b"HTTP/1.1 407 No\r\nContent-Length: 0\r\n\r\n"))
    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)

    async def scenario() -> str:
        async with corporate.running() as (_, proxy_url):
            monkeypatch.setenv("HTTPS_PROXY", shape.format(proxy_url.removeprefix("http://")))
            upstream = Upstream(timeout=5, connections=1, max_response_bytes=1024)
            await upstream.start()
            try:
                with pytest.raises(UpstreamError) as caught:
                    await upstream.send("POST", "https://api.stripe.test/v1/x", {}, b"a=1")
            finally:
                await upstream.close()
            return str(caught.value)

    reason = asyncio.run(scenario())
    assert reason == "the CONNECT proxy is not an http://host:port URL"
    assert corporate.connections == 0


def test_an_answer_that_comes_before_the_request_is_written_ends_its_connection() -> None:
    """A vendor may answer at the headers (a 401), before reading the body, and keep the
    connection: what of the body the client had not written yet went ahead of the next call's
    request, and a vendor that read it as a request answered it in that call's stead."""
    body = b"a=" + b"x" * (16 << 20)  # more than the socket buffers between the two hold

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        requests.append(head)
        if b"/early" not in head:
            await reader.readexactly(3)
            writer.write(ok(b'{"id": "pi_2"}'))
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        tail = b""  # the rest of the body, then what follows, read as the next request
        while b"/second" not in tail:
            data = await reader.read(1 << 20)
            if not data:
                return
            tail = tail[-16:] + data
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    vendor = Vendor(script)

    async def scenario() -> list[UpstreamResponse]:
        async with vendor.running() as (upstream, base):
            early = await upstream.send("POST", base + "/early", {}, body)
            second = await upstream.send("POST", base + "/second", {}, b"a=2")
            return [early, second]

    early, second = asyncio.run(scenario())
    assert early.status == 401
    assert (second.status, second.body) == (200, b'{"id": "pi_2"}')
    assert vendor.connections == 2


def test_a_refused_header_keeps_the_secret_out_of_the_error() -> None:
    """The UnicodeEncodeError behind a header that is not latin-1 held the whole request head,
    the vendor secret included (`.object`), as the UpstreamError's cause."""
    vendor = Vendor(keep_answering(ok()))
    headers = [("Authorization", "Bearer sk_live_real"), ("X-Note", "\u20ac")]

    async def scenario() -> UpstreamError:
        async with vendor.running() as (upstream, base):
            with pytest.raises(UpstreamError) as caught:
                await upstream.send("POST", base + "/v1/x", headers, b"a=1")
        return caught.value

    error: BaseException | None = asyncio.run(scenario())
    while error is not None:
        assert "sk_live_real" not in repr(vars(error)) + repr(getattr(error, "object", ""))
        error = error.__cause__ or error.__context__


# What was checked and found right, kept so that it stays so.


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{}",  # then closed
    ],
)
def test_answers_framed_two_ways_or_cut_are_upstream_errors(answer: bytes) -> None:
    """A length both ways (the smuggling shape), two lengths, a bad chunk size, a chunked body
    the connection's end cut: llhttp refuses them, or the end comes before the answer's."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        requests.append(await read_request(reader))
        writer.write(answer)
        await writer.drain()

    vendor = Vendor(script)

    async def scenario() -> None:
        async with vendor.running() as (upstream, base):
            with pytest.raises(UpstreamError, match="connection to the vendor failed"):
                await upstream.send("POST", base + "/v1/x", {}, b"a=1")
            assert pooled(upstream) == []

    asyncio.run(scenario())


def test_a_cancelled_call_leaves_no_connection_nor_slot_behind() -> None:
    """Cancelled waiting for its answer (its connection is cut: the answer may still come), and
    cancelled waiting for a slot; the next call gets the slot and a connection of its own."""
    release = asyncio.Event()
    vendor = Vendor(keep_answering(ok(), release))

    async def scenario() -> int:
        async with vendor.running(connections=1) as (upstream, base):
            answering = asyncio.ensure_future(upstream.send("POST", base + "/a", {}, b"a=1"))
            queued = asyncio.ensure_future(upstream.send("POST", base + "/b", {}, b"a=2"))
            await until(lambda: bool(vendor.requests))
            queued.cancel()
            answering.cancel()
            for call in (queued, answering):
                with pytest.raises(asyncio.CancelledError):
                    await call
            assert pooled(upstream) == []
            release.set()
            return (await upstream.send("POST", base + "/c", {}, b"a=3")).status

    assert asyncio.run(scenario()) == 200
    assert [r.split(b" ")[1] for r in vendor.requests] == [b"/a", b"/c"]
    assert vendor.connections == 2


# A vendor over TLS, and a CONNECT proxy (`tunnel`) in front of it.


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def tunnel(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    requests.append(request)
    host, port = request.split(b" ")[1].decode().rsplit(":", 1)
    to_reader, to_writer = await asyncio.open_connection(host, int(port))
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await asyncio.gather(relay(reader, to_writer), relay(to_reader, writer))


@contextlib.asynccontextmanager
async def over_tls(vendor: Vendor, ca: CertificateAuthority) -> AsyncIterator[str]:
    """`vendor` served over TLS with a certificate of `ca`: its https://localhost:port."""
    serving = ca.server_cert("vendor")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(serving.cert_file, serving.key_file)
    server = await asyncio.start_server(vendor._serve, "127.0.0.1", 0, ssl=context)
    try:
        yield f"https://localhost:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def test_a_call_through_a_connect_proxy_keeps_its_tls_tunnel_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tunnel (loop.start_tls over the proxy's connection) on both loops, kept alive: two
    calls, one CONNECT, one TLS connection to the vendor."""
    ca = CertificateAuthority(tmp_path / "pki", "vendor test CA")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))
    vendor = Vendor(keep_answering(ok(b'{"id": "pi_1"}')))
    corporate = Vendor(tunnel)

    async def scenario() -> list[bytes]:
        async with over_tls(vendor, ca) as base, corporate.running() as (_, proxy_url):
            upstream = Upstream(timeout=5, connections=1, max_response_bytes=1024, proxy=proxy_url)
            await upstream.start()
            try:
                answers = [await upstream.send("GET", base + "/v1/x", {}, None) for _ in range(2)]
            finally:
                await upstream.close()
        return [answer.body for answer in answers]

    assert asyncio.run(scenario()) == [b'{"id": "pi_1"}'] * 2
    assert len(corporate.requests) == 1 and vendor.connections == 1
    assert vendor.requests[0].startswith(b"GET /v1/x HTTP/1.1\r\nHost: localhost:")


@pytest.mark.parametrize("through", ["direct", "tunnel"])
def test_a_certificate_the_client_does_not_trust_is_an_upstream_error(
    through: str, tmp_path: Path
) -> None:
    """ssl.SSLCertVerificationError (an SSLError, an OSError and a ValueError), from
    create_connection and from start_tls over a tunnel, on both loops."""
    untrusted = CertificateAuthority(tmp_path / "pki", "a CA the client does not know")
    vendor = Vendor(keep_answering(ok()))
    corporate = Vendor(tunnel)

    async def scenario() -> str:
        async with over_tls(vendor, untrusted) as base, corporate.running() as (_, proxy_url):
            proxy = proxy_url if through == "tunnel" else None
            upstream = Upstream(timeout=5, connections=1, max_response_bytes=1024, proxy=proxy)
            await upstream.start()
            try:
                with pytest.raises(UpstreamError) as caught:
                    await upstream.send("GET", base + "/v1/x", {}, None)
            finally:
                await upstream.close()
        return str(caught.value)

    assert asyncio.run(scenario()) == "connection to the vendor failed: SSLCertVerificationError"
    assert vendor.requests == []


def test_a_connect_proxy_that_never_answers_is_a_timeout_and_its_connection_is_closed() -> None:
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]
    ) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.read()  # until the client hangs up

    corporate = Vendor(silent)

    async def scenario() -> str:
        async with corporate.running() as (_, proxy_url):
            upstream = Upstream(
                timeout=0.3, connections=1, max_response_bytes=1024, proxy=proxy_url
            )
            await upstream.start()
            try:
                with pytest.raises(UpstreamError) as caught:
                    await upstream.send("POST", "https://api.stripe.test/v1/x", {}, b"a=1")
            finally:
                await upstream.close()
            await until(lambda: not corporate.open_now)  # the client closed its connection
        return str(caught.value)

    assert asyncio.run(scenario()).startswith("the vendor did not answer in time")
    assert len(corporate.requests) == 1
