"""Fan-out headroom: a burst of C concurrent calls (one per pod of a fan-out) to a vendor that
answers in 250 ms, through keybrake with upstream pools of several sizes and through the bare
Python passthrough, on SQLite. Each round fires C calls at once and waits for all; latency is per
call, so what a pool queues shows as calls taking two or more vendor round trips.

    python -m tests.bench.fanout                       # C = 50 and 500, pools 64..1024
    python -m tests.bench.fanout --concurrency 500 --pools 256,512 --rounds 4

Not part of `make test`: tests never time anything. Numbers go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.run import issue_key, keybrake, passthrough  # noqa: E402
from tests.fakes.server import bound_socket  # noqa: E402

VENDOR_SECONDS = 0.25
BODY = '{"id":"pi_fanout","object":"payment_intent","amount":100,"currency":"usd"}'


class SlowVendor:
    """Stripe-shaped answers after 250 ms, any number at once; counts the most in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self._sock = bound_socket()
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        started = threading.Event()

        async def answer(request: web.Request) -> web.Response:
            await request.read()
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(VENDOR_SECONDS)
            finally:
                self.in_flight -= 1
            return web.Response(
                text=BODY,
                content_type="application/json",
                headers={"Request-Id": "req_" + uuid.uuid4().hex[:14]},
            )

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", answer)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, self._sock, backlog=4096).start())
            started.set()
            loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        started.wait()

    def reset(self) -> None:
        self.peak = 0


async def bursts(url: str, key: str, concurrency: int, rounds: int) -> list[float]:
    """`rounds` bursts of `concurrency` simultaneous calls; each call's seconds."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(n: int) -> None:
            body = f"amount=100&currency=usd&metadata[n]={uuid.uuid4().hex}"
            started = time.perf_counter()
            async with session.post(
                f"{url}/stripe/v1/payment_intents",
                data=body,
                headers={
                    "Authorization": f"Bearer {key}.pod-{n}",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            ) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(n) for n in range(concurrency)))  # warm the connections
        latencies.clear()
        for _ in range(rounds):
            await asyncio.gather(*(one(n) for n in range(concurrency)))
    return latencies


def describe(name: str, latencies: list[float], peak: int) -> str:
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    added = statistics.median(ordered) * 1000 - VENDOR_SECONDS * 1000
    return (
        f"| {name} | {len(ordered)} | {at(0.5):.0f} | {at(0.99):.0f} | {ordered[-1] * 1000:.0f} "
        f"| {added:+.0f} | {peak} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="50,500")
    parser.add_argument("--pools", default="64,128,256,512,1024")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    vendor = SlowVendor()
    print("| through | calls | p50 ms | p99 ms | max ms | p50 added ms | vendor peak in flight |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            with passthrough(vendor.url, pool=0) as (bare, _):
                vendor.reset()
                took = asyncio.run(bursts(bare, "sk_test_bench", concurrency, args.rounds))
                print(describe(f"bare passthrough, {concurrency} at once", took, vendor.peak))
            for pool in (int(p) for p in args.pools.split(",")):
                database = f"sqlite:///{workdir / f'fanout-{concurrency}-{pool}.db'}"
                settings = {"KEYBRAKE_UPSTREAM_CONNECTIONS": str(pool)}
                with keybrake(workdir, vendor.url, database, settings=settings) as (url, _):
                    key, _ = issue_key(url)
                    vendor.reset()
                    took = asyncio.run(bursts(url, key, concurrency, args.rounds))
                    name = f"keybrake, pool {pool}, {concurrency} at once"
                    print(describe(name, took, vendor.peak), flush=True)


if __name__ == "__main__":
    main()
