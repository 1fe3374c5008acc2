"""Dashboard render time at 100,000 keys: the runs page (first page, a filter, a later page) and
one run's page with 20,000 audit rows, on SQLite and PostgreSQL, in-process (no network).

    python -m tests.bench.dashboard                  # both backends, 100k keys
    python -m tests.bench.dashboard --keys 20000 --backends sqlite

Not part of `make test`: tests never time anything. Numbers go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from keybrake.proxy.store import open_store  # noqa: E402
from keybrake.proxy.store.records import AuditRecord, Event, KeyRecord  # noqa: E402
from tests.inproc import Clock, app_client  # noqa: E402
from tests.proxyproc import ADMIN_KEY  # noqa: E402

START = datetime(2026, 11, 1, tzinfo=UTC)
KEYS_PER_RUN = 4
BIG_RUN = "argo/big-run-000"


async def populate(url: str, keys: int, audit_rows: int) -> None:
    store = open_store(url)
    await store.open()
    try:
        event = Event(ts=START, action="key.issue", actor="admin", outcome="ok")
        batch = []
        for i in range(keys):
            run = i // KEYS_PER_RUN
            created = START + timedelta(seconds=run * 10 + i % KEYS_PER_RUN)
            label = BIG_RUN if run == keys // KEYS_PER_RUN - 1 else f"argo/run-{run:06d}"
            record = KeyRecord(
                key_id=f"vk_{i:016x}",
                key_hash=hashlib.sha256(str(i).encode()).digest(),
                vendor="stripe",
                label=label,
                daily_cap_micros=None,
                max_per_call_micros=None,
                allowed_endpoints=("POST /v1/payment_intents",),
                metadata={},
                dedupe_window_s=600,
                created_at=created,
                # A tenth of the runs still live at the end of the month.
                expires_at=created + timedelta(days=60 if run % 10 == 0 else 1),
                total_cap_micros=50_000_000,
            )
            batch.append(store.create_key(record, event))
            if len(batch) == 500:
                await asyncio.gather(*batch)
                batch = []
        await asyncio.gather(*batch)
        big_start = START + timedelta(seconds=(keys // KEYS_PER_RUN - 1) * 10)
        rows = []
        for n in range(audit_rows):
            rows.append(
                store.record(
                    AuditRecord(
                        ts=big_start + timedelta(seconds=n * 3),
                        vendor="stripe",
                        method="POST",
                        path="/v1/payment_intents",
                        status=429 if n % 50 == 49 else 200,
                        decision="cap_hit" if n % 50 == 49 else "forwarded",
                        key_id=f"vk_{keys - 1:016x}",
                        label=BIG_RUN,
                        caller_tag=f"pod-{n % 300}",
                        settled_micros=0 if n % 50 == 49 else 1000,
                        vendor_request_id=f"req_{n:014d}",
                    )
                )
            )
            if len(rows) == 500:
                await asyncio.gather(*rows)
                rows = []
        await asyncio.gather(*rows)
    finally:
        await store.close()


@contextmanager
def database(backend: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/bench.db"
    else:
        from tests.pg import pg_database

        with pg_database() as url:
            yield url


def timed(client: object, path: str, repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        answer = client.get(path)  # type: ignore[attr-defined]
        samples.append((time.perf_counter() - began) * 1000)
        assert answer.status_code == 200, answer.text[:300]
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--audit-rows", type=int, default=20_000)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    for backend in args.backends.split(","):
        with database(backend) as url, tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            asyncio.run(populate(url, args.keys, args.audit_rows))
            print(
                f"{backend}: {args.keys} keys, {args.audit_rows} audit rows written in "
                f"{time.perf_counter() - began:.0f} s"
            )
            clock = Clock(START + timedelta(days=30))
            with app_client(Path(tmp), clock=clock, database_url=url) as client:
                client.headers.pop("Authorization")
                form = client.get("/ui/login").text
                csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
                client.post("/ui/login", data={"csrf": csrf, "token": ADMIN_KEY})
                first = client.get("/ui/").text
                later = re.search(r'href="([^"]+)" id="next-page"', first).group(1)  # type: ignore[union-attr]
                pages = {
                    "runs, first page": "/ui/",
                    "runs, second page": later.replace("&amp;", "&"),
                    "runs, live only": "/ui/?status=live",
                    "runs, label contains 'run-0123'": "/ui/?q=run-0123",
                    f"one run, {args.audit_rows} audit rows": f"/ui/run?label={BIG_RUN}",
                }
                for name, path in pages.items():
                    median, p90 = timed(client, path, args.repeat)
                    print(f"  {name:40s} median {median:7.1f} ms   p90 {p90:7.1f} ms")


if __name__ == "__main__":
    main()
