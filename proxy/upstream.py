"""The HTTP client towards vendors: HTTP/1.1 over pooled keep-alive connections, with a bounded
pool, timeouts, a response size limit and a corporate CONNECT proxy when the network has one.

Its own, on asyncio's transports with httptools (llhttp, the parser uvicorn serves with), rather
than a general client, by measurement: it is a third of a priced call's CPU on this path, and
the vendors need little of HTTP (no redirects, no cookies, no compression asked for). Forwarding
the same call at 64 at once: aiohttp's session 121-193 µs of CPU per call, this client 60-65 µs
(docs/benchmarks.md). httpx stays the client of the CLI and the tests.

It never sends a request twice: a vendor call may move money, so a connection that fails (a
kept-alive one the vendor closed included) is the caller's `UpstreamError`, whose outcome the
ledger counts as unknown.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import time
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import httptools

from keybrake.proxy.errors import UpstreamError  # from the one tree; exported here too

__all__ = ["HOP_BY_HOP", "Upstream", "UpstreamError", "UpstreamResponse"]

# Never forwarded in either direction: connection-level headers, and what we recompute or replace.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "authorization",
        "cookie",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    }
)


# Every answer of the proxy carries its server's own `date` and `server`: the vendor's would
# make two of each.
OWN_HEADERS = frozenset({"date", "server"})
_NOT_RELAYED = HOP_BY_HOP | OWN_HEADERS

# A kept-alive connection idle longer than this is closed rather than used: a server may have
# closed it meanwhile, and a request written into a closed connection fails with an unknown
# outcome. Below the usual keep-alive timeouts of servers and load balancers (60 s and more).
IDLE_SECONDS = 15.0

# Methods whose requests carry no body unless they have one (others say `Content-Length: 0`).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

# What a request's head may hold, checked once over the whole head (and its line count): a
# method token, a target without spaces or control characters, then `name: value` lines (token
# names, values of latin-1 characters but CR, LF and NUL). Nothing the workload sent can split
# the request, and the head is then written as latin-1 without a UnicodeEncodeError (which
# would carry the whole head, the vendor secret included, as its `.object`).
_NAME = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # an RFC 9110 token
_VALUE = r"[^\r\n\0\u0100-\U0010ffff]*"
_HEAD = re.compile(rf"{_NAME} [!-~\x80-\xff]+ HTTP/1\.1\r\n(?:{_NAME}: {_VALUE}\r\n)*\r\n")

# The most an answer's head (status line and headers, interim answers before it included) may
# take: llhttp has no limit of its own, and httptools gathers a header's pieces as they come.
HEAD_LIMIT = 65536


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


# NO_PROXY as urllib (and curl) read it; in CPython's urllib.request, missing from typeshed.
_no_proxy = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]


def proxy_for(url: str, configured: str | None) -> str | None:
    """The CONNECT proxy a vendor call to `url` goes through: `configured`
    (KEYBRAKE_UPSTREAM_PROXY), else HTTPS_PROXY from the environment; none for a host NO_PROXY
    names. Only https calls are proxied: through a tunnel the proxy relays TLS it cannot read,
    while a plain-http call would show it the vendor secret (those are test upstreams anyway)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return None
    proxy = configured or urllib.request.getproxies_environment().get("https")
    if not proxy or _no_proxy(parts.hostname):
        return None
    return proxy


@dataclass(frozen=True, slots=True)
class _Proxy:
    """A CONNECT proxy as its http:// URL says: where it listens, and its credentials."""

    host: str
    port: int
    authorization: str  # a `Proxy-Authorization` line, or ""


def _proxy(url: str) -> _Proxy:
    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError:
        port = 0
    if parts.scheme != "http" or not parts.hostname or not port:
        # An https:// proxy would be sent a plaintext CONNECT (its password in the clear) on
        # the port where it speaks TLS. The URL is not shown: it may hold that password.
        raise UpstreamError("the CONNECT proxy is not an http://host:port URL")
    authorization = ""
    if parts.username is not None:
        user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = f"Proxy-Authorization: Basic {base64.b64encode(user.encode()).decode()}\r\n"
    return _Proxy(parts.hostname, port, authorization)


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where calls to one scheme://host:port go, decided once."""

    host: str
    port: int
    tls: bool
    host_header: str  # the Host header's value
    authority: str  # host:port, as a CONNECT request names it
    proxy: _Proxy | None


def _origin(origin: str, configured_proxy: str | None) -> _Origin:
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"not an http(s) vendor address: {origin!r}")
    tls = parts.scheme == "https"
    default = 443 if tls else 80
    try:
        port = parts.port or default
    except ValueError as exc:
        raise UpstreamError(f"not an http(s) vendor address: {origin!r}") from exc
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    authority = f"{shown}:{port}"
    proxy = proxy_for(origin, configured_proxy)
    return _Origin(host, port, tls, host_header, authority, _proxy(proxy) if proxy else None)


class _Answer(asyncio.Protocol):
    """One connection to a vendor, one request at a time: the answer parsed by llhttp as it
    arrives, handed to the waiting request when complete."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._head_only = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._head_bytes = 0  # read before the final answer's head was complete
        self._headers_done = False  # the final answer's head (not an interim answer's) was read

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if exc is None and self._headers_done and not self._framed():
            self._finish(False)  # an answer that ends where the connection does (not a reset)
        else:
            waiter.set_exception(
                UpstreamError("connection to the vendor failed: the connection was closed")
            )

    def eof_received(self) -> bool | None:
        self.closed = True  # never handed out again; a waiting request hears connection_lost
        return None

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(f"connection to the vendor failed: an unreadable answer ({exc})")
            return
        if not self._headers_done and self._waiter is not None:
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_LIMIT:
                self._fail("the vendor's response head exceeds the size limit")

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # Another answer after the one asked for, in the same read (a second one, or the
            # start of one): where the next answer on this connection begins is not known any
            # more. Raised to stop the parse; the connection is aborted (`data_received`).
            raise UpstreamError("an answer nobody asked for")
        self._headers, self._chunks, self._size = [], [], 0
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a trailer, after a chunked body: neither relayed nor read (as aiohttp)
        self._headers.append((name, value))

    def _framed(self) -> bool:
        """Whether the answer says where it ends (a Content-Length, or chunked), so that the
        connection closing before then cuts it: read only when the connection closes."""
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                return True
            if lowered == b"transfer-encoding" and value.strip().lower().endswith(b"chunked"):
                return True
        return False

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status >= 200:
            self._headers_done = True
            if self._head_only:  # an answer to HEAD has no body, whatever its length says
                self._finish(False)
        elif status == 101:  # never asked for: `upgrade` is not forwarded (HOP_BY_HOP)
            self._fail("connection to the vendor failed: it answered 101 Switching Protocols")
        # Else an interim answer (100 Continue, 103 Early Hints): the final one follows.

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._limit:
            self._fail("the vendor's response exceeds the size limit")
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._headers_done:  # the final answer's end, not an interim one's
            self._finish(self._parser.should_keep_alive())

    # the request's side

    def request(self, head: bytes, body: bytes | None, head_only: bool) -> asyncio.Future[Any]:
        assert self.transport is not None
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        if self.closed:  # lost before the request was written (a vendor that spoke first)
            waiter.set_exception(UpstreamError("connection to the vendor failed: it was closed"))
            return waiter
        self._head_only = head_only
        self._headers_done, self._head_bytes = False, 0
        self.transport.write(head + body if body else head)
        return waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, reason: str) -> None:
        waiter, self._waiter = self._waiter, None
        self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamError(reason))

    def _finish(self, reusable: bool) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        transport = self.transport
        # Not kept: a connection the answer ends, a HEAD's (its length may count a body that is
        # not there), and one answered before the request was all written (a vendor may answer
        # at the headers): what is left of the body would go ahead of the next request.
        if (
            not reusable
            or self._head_only
            or transport is None
            or transport.get_write_buffer_size()
        ):
            self.abort()
        status = self._parser.get_status_code()
        # The vendor's header bytes as they came (latin-1 maps each byte to one character and
        # back): a UTF-8 reading of a value such as "\xe9" could not be written to the workload
        # again, nor stored for a replay.
        headers: list[tuple[str, str]] = []
        encoding = None
        for raw_name, raw_value in self._headers:
            name = raw_name.decode("latin-1")
            lowered = name.lower()
            if lowered == "content-encoding":
                encoding = raw_value.decode("latin-1").strip().lower()
            if lowered not in _NOT_RELAYED and not lowered.startswith("x-keybrake"):
                headers.append((name, raw_value.decode("latin-1")))
        body = b"".join(self._chunks)
        if body and encoding not in (None, "", "identity"):
            try:
                body = _decoded(body, encoding, self._limit)
            except UpstreamError as exc:
                self.abort()
                waiter.set_exception(exc)
                return
        waiter.set_result(UpstreamResponse(status, headers, body))


def _decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """A compressed answer's bytes (the proxy asks for none, but a server may send it anyway),
    within the size limit; an encoding it cannot read is an error, never relayed as it is."""
    if encoding in ("gzip", "x-gzip"):
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflate = zlib.decompressobj(zlib.MAX_WBITS if body[:1] == b"x" else -zlib.MAX_WBITS)
    else:
        raise UpstreamError(f"the vendor's answer has an unknown content encoding ({encoding})")
    try:
        data = inflate.decompress(body, limit + 1)
    except zlib.error as exc:
        raise UpstreamError("the vendor's compressed answer could not be read") from exc
    if len(data) > limit:
        raise UpstreamError("the vendor's response exceeds the size limit")
    if not inflate.eof:  # cut short: the start of an answer, not a whole one
        raise UpstreamError("the vendor's compressed answer could not be read")
    return data


class _Tunnel(asyncio.Protocol):
    """The CONNECT proxy's answer to the tunnel request, read up to its blank line."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if b"\r\n\r\n" in self._buffer and not self.answered.done():
            self.answered.set_result(self._buffer)
        elif len(self._buffer) > 65536 and not self.answered.done():
            self.answered.set_exception(UpstreamError("the CONNECT proxy's answer is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(
                UpstreamError("connection to the vendor failed: the CONNECT proxy hung up")
            )


class Upstream:
    def __init__(
        self,
        *,
        timeout: float,
        connections: int,
        max_response_bytes: int,
        proxy: str | None = None,
    ) -> None:
        self._timeout = timeout
        self._connect_timeout = min(timeout, 10.0)
        self._max_response_bytes = max_response_bytes
        self._proxy = proxy
        self._origins: dict[str, _Origin] = {}  # by scheme://host:port, decided once
        self._connections = connections
        self._idle: dict[_Origin, list[_Answer]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        # Made here, not at import: the certificates are the system's, or SSL_CERT_FILE's as the
        # environment says when the proxy starts.
        self._tls = ssl.create_default_context()
        self._slots = asyncio.Semaphore(self._connections)  # of the loop that serves
        self._idle = {}  # an earlier start's connections are its loop's, which may be gone

    async def close(self) -> None:
        self._slots = None  # a call still in flight closes its connection when it ends (`send`)
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.abort()

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | Sequence[tuple[str, str]],
        body: bytes | None,
    ) -> UpstreamResponse:
        slots = self._slots
        if slots is None:
            raise UpstreamError("the vendor client is not running (closed, or never started)")
        # The origin (scheme://host:port, up to the path's slash) by a string slice: no URL
        # parsing on the request path.
        end = url.find("/", url.find("//") + 2)
        origin_text, target = (url, "/") if end < 0 else (url[:end], url[end:])
        origin = self._origins.get(origin_text)
        if origin is None:
            origin = self._origins[origin_text] = _origin(origin_text, self._proxy)
        items = headers.items() if isinstance(headers, Mapping) else headers
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        if body:
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif method not in _NO_BODY_METHODS:
            lines.append("Content-Length: 0\r\n")
        lines.extend(f"{name}: {value}\r\n" for name, value in items)
        lines.append("\r\n")
        text = "".join(lines)
        # Each element of `lines` ends one line (the first two): a value that holds a line
        # break of its own would make more, even where what follows it reads as a header.
        if text.count("\n") != len(lines) + 1 or _HEAD.fullmatch(text) is None:
            raise UpstreamError("the request cannot be written as HTTP/1.1 (a malformed header)")
        head = text.encode("latin-1")  # all latin-1, as `_HEAD` says
        try:
            async with asyncio.timeout(self._timeout):
                async with slots:
                    connection = self._take(origin) or await self._connect(origin)
                    try:
                        answer: UpstreamResponse = await connection.request(
                            head, body, method == "HEAD"
                        )
                    except BaseException:
                        connection.abort()  # cut mid-answer (a timeout, a cancel): unusable
                        raise
                    if self._slots is not slots:  # closed (or started again) meanwhile
                        connection.abort()
                    elif not connection.closed:
                        connection.idle_since = time.monotonic()
                        self._idle.setdefault(origin, []).append(connection)
                    return answer
        except TimeoutError as exc:
            raise UpstreamError("the vendor did not answer in time") from exc

    def _take(self, origin: _Origin) -> _Answer | None:
        """The most recently used open connection to `origin`, if one is idle and fresh."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_usable = time.monotonic() - IDLE_SECONDS
        while idle:
            connection = idle.pop()
            # A transport the loop is closing (a reset read) is not `closed` until its
            # connection_lost, which comes later: a request written into it would go nowhere.
            transport = connection.transport
            if (
                not connection.closed
                and connection.idle_since >= oldest_usable
                and transport is not None
                and not transport.is_closing()
            ):
                return connection
            connection.abort()
        return None

    async def _connect(self, origin: _Origin) -> _Answer:
        loop = asyncio.get_running_loop()
        connection = _Answer(self._max_response_bytes)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if origin.proxy is not None:
                    await self._tunnel(origin, connection)
                else:
                    await loop.create_connection(
                        lambda: connection,
                        origin.host,
                        origin.port,
                        ssl=self._tls if origin.tls else None,
                        server_hostname=origin.host if origin.tls else None,
                    )
        except TimeoutError as exc:
            connection.abort()
            raise UpstreamError("the vendor did not answer in time (connecting)") from exc
        except (OSError, ssl.SSLError) as exc:
            connection.abort()
            raise UpstreamError(f"connection to the vendor failed: {type(exc).__name__}") from exc
        return connection

    async def _tunnel(self, origin: _Origin, connection: _Answer) -> None:
        """A TLS connection to the vendor through the CONNECT proxy: the proxy relays the
        handshake and the encrypted bytes, and reads neither the secret nor the call."""
        proxy = origin.proxy
        assert proxy is not None and self._tls is not None
        loop = asyncio.get_running_loop()
        raw, tunnel = await loop.create_connection(_Tunnel, proxy.host, proxy.port)
        try:
            authority = origin.authority
            request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            raw.write(f"{request}{proxy.authorization}\r\n".encode("latin-1"))
            answer = await tunnel.answered
            status = answer.split(b"\r\n", 1)[0].split(b" ")
            if len(status) < 2 or status[1] != b"200":
                code = status[1].decode("latin-1", "replace") if len(status) > 1 else "?"
                raise UpstreamError(
                    f"connection to the vendor failed: the CONNECT proxy answered {code}"
                )
            tls = await loop.start_tls(raw, connection, self._tls, server_hostname=origin.host)
            if tls is None:
                raise UpstreamError("connection to the vendor failed: no TLS over the tunnel")
        except BaseException:
            raw.abort()
            raise
        connection.connection_made(tls)
