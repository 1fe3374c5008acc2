"""The base of vendors answered in the test's own process, behind `build_app(upstream=...)`: the
proxy's upstream seam with no connections to open or close."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from keybrake.proxy.upstream import Upstream, UpstreamResponse


class InProcessUpstream(Upstream):
    """`send` hands `respond` the request with its headers as (name, value) pairs."""

    def __init__(self) -> None:
        super().__init__(timeout=5, connections=1, max_response_bytes=1 << 20)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | Sequence[tuple[str, str]],
        body: bytes | None,
    ) -> UpstreamResponse:
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        return await self.respond(method, url, pairs, body)

    async def respond(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> UpstreamResponse:
        raise NotImplementedError
