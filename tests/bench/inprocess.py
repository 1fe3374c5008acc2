"""The proxy's own CPU per priced call, in one process: no HTTP server, no HTTP client.

    python tests/bench/inprocess.py --backend sqlite --calls 4000 [--profile out.pstats]

Run by path with any build's Python (`OTHER-VENV/bin/python tests/bench/inprocess.py`): it
imports only `keybrake` and its dependencies, so it measures whichever keybrake that interpreter
has installed, and builds from before the `upstream=` seam of `build_app` work the same (the
vendor side is patched onto `Upstream`). The ASGI app is driven directly (scope, receive,
send), `concurrency` calls at a time, each a Stripe PaymentIntent priced from its form body
against a key with a daily cap (and, as in the wrk bench, no dedupe window), the vendor answering at once from memory. What it prints is CPU
time (`time.process_time`: the event loop and the SQLite writer thread together) per call,
over the calls after a warm-up: the part of a call that is keybrake's, which wrk's req/s mixes
with uvicorn's and aiohttp's. With `--profile`, a cProfile of the measured calls.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ADMIN_KEY = "kba_bench_admin_token_0123456789"
# Each answer a PaymentIntent of its own, with a request id of its own, as Stripe's are.
ANSWER = (
    '{{"id": "pi_bench{n}", "object": "payment_intent", "amount": 2000, "currency": "usd", '
    '"status": "requires_payment_method"}}'
)


def _patch_upstream() -> None:
    """The vendor answers from memory: `Upstream` opens no connection in any build."""
    from keybrake.proxy import upstream

    async def start(self: Any) -> None:
        return None

    async def close(self: Any) -> None:
        return None

    numbers = itertools.count()

    async def send(self: Any, method: str, url: str, headers: Any, body: Any) -> Any:
        n = next(numbers)
        return upstream.UpstreamResponse(
            200,
            [("content-type", "application/json"), ("request-id", f"req_bench{n}")],
            ANSWER.format(n=n).encode(),
        )

    upstream.Upstream.start = start  # type: ignore[method-assign]
    upstream.Upstream.close = close  # type: ignore[method-assign]
    upstream.Upstream.send = send  # type: ignore[method-assign]


async def _call(
    app: Any, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        + [(b"content-length", str(len(body)).encode()), (b"host", b"bench")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never hangs up
        return {"type": "http.disconnect"}

    status = 0
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def _lifespan(app: Any) -> tuple[asyncio.Task[None], asyncio.Queue[Any]]:
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "state": {}}, inbox.get, outbox.put))
    message = await outbox.get()
    if message["type"] != "lifespan.startup.complete":
        raise SystemExit(f"the app did not start: {message}")
    return task, inbox


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.upstream:
        _patch_upstream()
    from keybrake.proxy.app import build_app
    from keybrake.proxy.settings import Settings

    app = build_app(Settings())  # from the KEYBRAKE_* variables main() sets
    # The collector as `keybrake serve` sets it (keybrake.proxy.asgi), in every build measured.
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    lifespan, inbox = await _lifespan(app)
    admin = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
    status, body = await _call(
        app,
        "POST",
        "/vault/keys",
        admin,
        json.dumps(
            {
                "vendor": "stripe",
                "daily_usd_cap": 1_000_000,
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "expires_in": "2h",
                "agent_run_label": "argo/bench-inprocess",
                "dedupe_window": "0",  # as the wrk bench: distinct bodies, no replays
                **({"constraints": json.loads(args.constraints)} if args.constraints else {}),
            }
        ).encode(),
    )
    if status != 201:
        raise SystemExit(f"issuing the key answered {status}: {body[:300]!r}")
    key = json.loads(body)["vault_key"]
    headers = {
        "authorization": f"Bearer {key}",
        "content-type": "application/x-www-form-urlencoded",
    }

    async def one(index: int) -> int:
        form = (
            f"amount={100 + index % 900}&currency=usd&customer=cus_bench&description=bench-{index}"
        ).encode()
        status, _ = await _call(app, "POST", "/stripe/v1/payment_intents", headers, form)
        return status

    async def calls(start: int, count: int) -> list[int]:
        statuses: list[int] = []
        for first in range(start, start + count, args.concurrency):
            batch = range(first, min(first + args.concurrency, start + count))
            statuses += await asyncio.gather(*(one(i) for i in batch))
        return statuses

    await calls(0, args.warmup)
    rounds: list[float] = []
    loop_rounds: list[float] = []  # the event loop's thread alone
    profile = cProfile.Profile() if args.profile else None
    done = args.warmup
    for _ in range(args.rounds):
        if profile:
            profile.enable()
        cpu, loop_cpu = time.process_time(), time.thread_time()
        statuses = await calls(done, args.calls)
        rounds.append((time.process_time() - cpu) / args.calls * 1e6)
        loop_rounds.append((time.thread_time() - loop_cpu) / args.calls * 1e6)
        if profile:
            profile.disable()
        done += args.calls
        wrong = [s for s in statuses if s != 200]
        if wrong:
            raise SystemExit(f"{len(wrong)} calls were not forwarded (first: {wrong[0]})")
    if profile:
        profile.dump_stats(args.profile)
    await inbox.put({"type": "lifespan.shutdown"})
    await lifespan
    return {
        "us_per_call": rounds,
        "median": statistics.median(rounds),
        "loop_median": statistics.median(loop_rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--calls", type=int, default=3000, help="calls per measured round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the rounds")
    parser.add_argument(
        "--constraints",
        metavar="JSON",
        help='the key\'s constraints, e.g. {"customers": ["cus_bench"], "max_calls_per_minute": '
        "1000000} (each call names customer cus_bench, constrained or not)",
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        help="a real Stripe-shaped upstream (the load bench's nginx, say) instead of the answer "
        "from memory: the HTTP client's part of a call is then measured too",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keybrake-inprocess-") as tmp:
        if args.backend == "sqlite":
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            drop = None
        else:
            url, drop = _pg_database(args.postgres)
        os.environ.update(
            {
                "KEYBRAKE_API_KEY": ADMIN_KEY,
                "KEYBRAKE_DATABASE_URL": url,
                "KEYBRAKE_STRIPE_SECRET_KEY": "sk_test_bench_secret_0123456789",
                "KEYBRAKE_STRIPE_API_BASE": args.upstream or "http://127.0.0.1:9",
            }
        )
        os.chdir(tmp)
        try:
            result = asyncio.run(run(args))
        finally:
            if drop:
                drop()
    rounds = ", ".join(f"{r:.0f}" for r in result["us_per_call"])
    print(
        f"{args.backend}: {result['median']:.0f} µs CPU per call, {result['loop_median']:.0f} of "
        f"them on the event loop's thread (rounds: {rounds})"
    )
    sys.stdout.flush()


def _pg_database(admin_url: str) -> tuple[str, Any]:
    import asyncpg

    name = "keybrake_inproc_" + uuid.uuid4().hex[:8]

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


if __name__ == "__main__":
    main()
