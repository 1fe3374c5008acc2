"""The bare Python anchor: Starlette + aiohttp forwarding every call, no accounting at all.

KEYBRAKE_BENCH_UPSTREAM=http://127.0.0.1:PORT uvicorn --factory tests.bench.passthrough:create_app
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HOP = {"host", "content-length", "connection", "authorization"}


def create_app() -> Starlette:
    upstream = os.environ["KEYBRAKE_BENCH_UPSTREAM"].rstrip("/")
    state: dict[str, aiohttp.ClientSession] = {}

    async def forward(request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k not in HOP}
        headers["authorization"] = "Bearer sk_test_bench"
        path = request.url.path.removeprefix("/stripe")
        async with state["session"].request(
            request.method, upstream + path, headers=headers, data=body
        ) as r:
            data = await r.read()
            out = {
                k: v for k, v in r.headers.items() if k.lower() not in HOP | {"content-encoding"}
            }
            return Response(data, status_code=r.status, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = int(os.environ.get("KEYBRAKE_BENCH_POOL", "256"))  # 0: unlimited
        state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pool))
        yield
        await state["session"].close()

    return Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "POST"])], lifespan=lifespan
    )
