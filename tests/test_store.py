"""Both store backends behind one interface: cap arithmetic, sweep, late settles."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keybrake.proxy.decisions import bucket_of
from keybrake.proxy.store import Store, open_store
from keybrake.proxy.store.records import KeyRecord, Listing, Reservation, Settlement
from tests.helpers import TEST_EVENT

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_fresh_url"))


def key(cap_micros: int) -> KeyRecord:
    return KeyRecord(
        key_id="vk_store",
        key_hash=b"h" * 32,
        vendor="stripe",
        label="argo/store",
        daily_cap_micros=cap_micros,
        max_per_call_micros=None,
        allowed_endpoints=("POST /v1/payment_intents",),
        metadata={},
        dedupe_window_s=0,
        created_at=NOW,
        expires_at=NOW + timedelta(hours=2),
    )


def reservation(record: KeyRecord, cost: int, index: int) -> Reservation:
    return Reservation(
        key=record,
        now=NOW,
        vendor="stripe",
        method="POST",
        path="/v1/payment_intents",
        caller_tag=f"pod-{index}",
        cost_micros=cost,
        amount=cost // 10_000,
        currency="usd",
        idempotency_key=None,
        request_hash=f"hash-{index}",
    )


def settlement(
    record: KeyRecord, audit_id: int, reserved: int, settled: int, status: int
) -> Settlement:
    return Settlement(
        audit_id=audit_id,
        key_id=record.key_id,
        bucket=bucket_of(NOW),
        vendor="stripe",
        reserved_micros=reserved,
        settled_micros=settled,
        status=status,
        decision="forwarded",
        vendor_request_id="req_1",
        latency_ms=1.0,
        idempotency_key=None,
        request_hash="x",
        dedupe=False,
        dedupe_token="",
        response=None,
    )


async def opened(url: str) -> Store:
    store = open_store(url)
    await store.open()
    return store


def test_concurrent_reservations_never_pass_the_cap(database_url: str) -> None:
    async def run() -> Counter[str]:
        store = await opened(database_url)
        try:
            record = key(100_000_000)
            await store.create_key(record, TEST_EVENT)
            admissions = await asyncio.gather(
                *(store.reserve(reservation(record, 1_000_000, i)) for i in range(250))
            )
            view = await store.get_key(record.key_id, NOW)
            assert view is not None
            assert view.usage.reserved_micros == 100_000_000
            assert view.usage.calls == 250 and view.usage.cap_hits == 150
            return Counter(a.decision for a in admissions)
        finally:
            await store.close()

    assert asyncio.run(run()) == {"forwarded": 100, "cap_hit": 150}


def test_sweep_counts_stale_reservations_and_a_late_settle_corrects_them(database_url: str) -> None:
    async def run() -> None:
        store = await opened(database_url)
        try:
            record = key(10_000_000)
            await store.create_key(record, TEST_EVENT)
            stale = await store.reserve(reservation(record, 4_000_000, 1))
            fresh = await store.reserve(reservation(record, 1_000_000, 2))
            assert await store.sweep(NOW - timedelta(seconds=1)) == 0
            assert await store.sweep(NOW + timedelta(seconds=1)) == 2
            view = await store.get_key(record.key_id, NOW)
            assert view is not None
            assert (view.usage.spent_micros, view.usage.reserved_micros) == (5_000_000, 0)
            # The "dead" call answers after all: the vendor refused it, so nothing was spent.
            await store.settle(settlement(record, stale.audit_id, 4_000_000, 0, 402))
            await store.settle(settlement(record, fresh.audit_id, 1_000_000, 1_000_000, 200))
            view = await store.get_key(record.key_id, NOW)
            assert view is not None
            assert (view.usage.spent_micros, view.usage.reserved_micros) == (1_000_000, 0)
        finally:
            await store.close()

    asyncio.run(run())


def test_stored_answers_are_forgotten_after_retention(database_url: str) -> None:
    from keybrake.proxy.store.records import StoredResponse

    async def run() -> None:
        store = await opened(database_url)
        try:
            record = key(10_000_000)
            await store.create_key(record, TEST_EVENT)
            first = reservation(record, 1_000_000, 1)
            first.idempotency_key = "idem-1"
            admitted = await store.reserve(first)
            answer = StoredResponse(200, [("content-type", "application/json")], b'{"id": "pi_1"}')
            done = settlement(record, admitted.audit_id, 1_000_000, 1_000_000, 200)
            done.idempotency_key, done.request_hash, done.response = "idem-1", "hash-1", answer
            await store.settle(done)
            assert (await store.reserve(first)).decision == "replayed"
            assert await store.forget_replays(NOW - timedelta(seconds=1)) == 0
            assert await store.forget_replays(NOW + timedelta(seconds=1)) == 1
            assert (await store.reserve(first)).decision == "forwarded"
        finally:
            await store.close()

    asyncio.run(run())


def test_postgres_commit_durability_is_the_operators_choice(pg_url: str) -> None:
    from keybrake.proxy.store.postgres import PostgresStore

    async def setting(durable: bool) -> str:
        store = PostgresStore(pg_url, durable_commits=durable, min_size=1, max_size=1)
        await store.open()
        try:
            show = "SHOW synchronous_commit"
            seen = {
                str(await store._run(lambda c: c.fetchval(show)))
                for _ in range(3)  # the same pooled connection, used again after release
            }
            # The request path's own connections, outside the pool, follow the same choice.
            for lane in (store._reserve_lane, store._settle_lane):
                seen.add(str(await store._run(lambda c: c.fetchval(show), lane)))
            assert len(seen) == 1
            return seen.pop()
        finally:
            await store.close()

    assert asyncio.run(setting(True)) == "on"
    assert asyncio.run(setting(False)) == "off"


def test_postgres_request_path_reconnects_after_losing_its_connection(pg_url: str) -> None:
    from keybrake.proxy.errors import StoreUnavailable
    from keybrake.proxy.store.postgres import PostgresStore

    async def run() -> list[str]:
        store = PostgresStore(pg_url, min_size=1, max_size=1)
        await store.open()
        try:
            record = key(cap_micros=10_000_000)
            await store.create_key(record, TEST_EVENT)
            assert (await store.reserve(reservation(record, 1_000_000, 0))).decision == "forwarded"
            lane = store._reserve_lane
            pid = await store._run(lambda c: c.fetchval("SELECT pg_backend_pid()"), lane)
            # What a database restart or a failover does to a connection it was holding.
            assert await store._run(lambda c: c.fetchval("SELECT pg_terminate_backend($1)", pid))
            outcomes = []
            for index in (1, 2):
                try:
                    admission = await store.reserve(reservation(record, 1_000_000, index))
                    outcomes.append(admission.decision)
                except StoreUnavailable:
                    outcomes.append("unavailable")
            view = await store.get_key(record.key_id, NOW)
            assert view is not None
            forwarded = 1 + outcomes.count("forwarded")
            assert view.usage.reserved_micros == forwarded * 1_000_000  # a failed call took nothing
            return outcomes
        finally:
            await store.close()

    outcomes = asyncio.run(run())
    # The next call at the latest is served on a fresh connection.
    assert outcomes in (["forwarded", "forwarded"], ["unavailable", "forwarded"])


def test_postgres_settle_finds_its_audit_row_by_primary_key(pg_url: str) -> None:
    """Settled calls leave dead entries in the partial index of in-flight rows until vacuum; a
    settle that looked its row up there read all of them, and slowed down as they piled up."""
    from keybrake.proxy.store.postgres import PostgresStore

    async def index_scans(store: PostgresStore) -> dict[str, int]:
        # Make the request-path connection publish its statistics now, then read them.
        await store._run(
            lambda c: c.execute("SELECT pg_stat_force_next_flush()"), store._settle_lane
        )

        async def read(c: Any) -> dict[str, int]:
            await c.execute("SELECT pg_stat_clear_snapshot()")
            rows = await c.fetch(
                "SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE relname = 'audit'"
            )
            return {row["indexrelname"]: row["idx_scan"] for row in rows}

        return await store._run(read)

    async def run() -> tuple[dict[str, int], dict[str, int]]:
        store = PostgresStore(pg_url, min_size=1, max_size=1)
        await store.open()
        try:
            record = key(cap_micros=10**12)
            await store.create_key(record, TEST_EVENT)
            before = await index_scans(store)
            for index in range(20):
                admission = await store.reserve(reservation(record, 1_000_000, index))
                await store.settle(
                    settlement(record, admission.audit_id, 1_000_000, 1_000_000, 200)
                )
            return before, await index_scans(store)
        finally:
            await store.close()

    before, after = asyncio.run(run())
    assert after["audit_pkey"] - before["audit_pkey"] >= 20
    assert after["audit_in_flight"] == before["audit_in_flight"]


def test_postgres_request_path_stays_on_indexes_after_analyze_of_empty_tables(
    pg_url: str,
) -> None:
    """`VACUUM ANALYZE` on a new database records the spend tables as empty; the plans then cached
    for the request path must still look rows up by key, not scan tables that bloat with every
    call."""
    from keybrake.proxy.store.postgres import PostgresStore

    async def run() -> int:
        store = PostgresStore(pg_url, min_size=1, max_size=1)
        await store.open()
        try:
            record = key(cap_micros=10**12)
            await store.create_key(record, TEST_EVENT)
            await store._run(lambda c: c.execute("VACUUM ANALYZE"))

            async def seq_scans_on_the_request_path() -> int:
                for lane in (store._reserve_lane, store._settle_lane):
                    await store._run(lambda c: c.execute("SELECT pg_stat_force_next_flush()"), lane)

                async def read(c: Any) -> int:
                    await c.execute("SELECT pg_stat_clear_snapshot()")
                    return int(
                        await c.fetchval(
                            "SELECT sum(seq_scan) FROM pg_stat_user_tables "
                            "WHERE relname IN ('spend_window', 'key_usage', 'replays')"
                        )
                    )

                return await store._run(read)

            before = await seq_scans_on_the_request_path()
            for index in range(20):  # PL/pgSQL settles on a generic plan after five calls
                admission = await store.reserve(reservation(record, 1_000_000, index))
                done = settlement(record, admission.audit_id, 1_000_000, 1_000_000, 200)
                await store.settle(done)
            return await seq_scans_on_the_request_path() - before
        finally:
            await store.close()

    assert asyncio.run(run()) == 0


def test_revoking_a_run_matches_namespace_uid_and_cluster_and_records_only_what_changed(
    database_url: str,
) -> None:
    """The exit handler's and the reaper's revoke: only the run's keys, and of two callers
    racing, each key is recorded as revoked once."""
    from dataclasses import replace

    from keybrake.proxy.store.records import EventFilter, Owner

    def run_key(key_id: str, namespace: str, uid: str, cluster: str = "prod") -> KeyRecord:
        return replace(
            key(1_000_000),
            key_id=key_id,
            key_hash=key_id.encode().ljust(32, b"-"),
            label="argo/nightly",
            metadata={"uid": uid, "cluster": cluster, "namespace": namespace},
            owner=Owner(None, namespace, None),
        )

    async def run() -> None:
        store = await opened(database_url)
        try:
            keys = [
                run_key("vk_mine_1", "payments", "uid-1"),
                run_key("vk_mine_2", "payments", "uid-1"),
                run_key("vk_same_name_other_ns", "search", "uid-2"),
                run_key("vk_other_cluster", "payments", "uid-1", cluster="staging"),
            ]
            for record in keys:
                await store.create_key(record, TEST_EVENT)
            event = replace(TEST_EVENT, action="label.revoke", detail={"reason": "test"})
            results = await asyncio.gather(
                *(
                    store.revoke_label(
                        "argo/nightly",
                        NOW,
                        event,
                        namespace="payments",
                        workflow_uid="uid-1",
                        cluster="prod",
                    )
                    for _ in range(4)
                )
            )
            revoked = sorted(k for keys_, _ in results for k in keys_)
            assert revoked == ["vk_mine_1", "vk_mine_2"]  # once each, over four callers
            for record in keys[2:]:
                view = await store.get_key(record.key_id, NOW)
                assert view is not None and view.key.revoked_at is None
            rows = await store.events(EventFilter(action="label.revoke"))
            outcomes = Counter(e.outcome for e in rows)
            assert outcomes == {"ok": 1, "unchanged": 3}
            [changed] = [e for e in rows if e.outcome == "ok"]
            assert changed.detail is not None
            assert sorted(changed.detail["revoked_keys"]) == revoked
            assert changed.detail["reason"] == "test"
        finally:
            await store.close()

    asyncio.run(run())


def test_key_lists_page_by_creation_time_then_id(database_url: str) -> None:
    """The `continue` position (created_at, id) on both backends: no row twice, none skipped,
    including rows issued at the same instant."""
    from dataclasses import replace

    async def run() -> None:
        store = await opened(database_url)
        try:
            made = []
            for n in range(7):
                created = NOW + timedelta(seconds=n // 3)  # three share each instant
                record = replace(
                    key(1_000_000),
                    key_id=f"vk_page_{n}",
                    key_hash=f"page-{n}".encode().ljust(32, b"-"),
                    created_at=created,
                    expires_at=created + timedelta(hours=2),
                )
                await store.create_key(record, TEST_EVENT)
                made.append(record.key_id)
            seen: list[str] = []
            before = None
            while True:
                page = await store.list_keys(Listing(limit=3, before=before), NOW)
                seen += [v.key.key_id for v in page]
                if len(page) < 3:
                    break
                before = (page[-1].key.created_at, page[-1].key.key_id)
            assert sorted(seen) == sorted(made) and len(seen) == len(made)
            every = [v.key.key_id for v in await store.list_keys(Listing(), NOW)]
            assert seen == every  # the same order as one long list
        finally:
            await store.close()

    asyncio.run(run())


def test_a_patch_applies_only_to_the_record_it_was_checked_against(database_url: str) -> None:
    """Compare-and-set: a patch carrying the caps it was judged by is refused ("changed") when
    another patch changed them meanwhile, and then changes nothing."""
    from keybrake.proxy.store.records import Patch

    async def run() -> None:
        store = open_store(database_url)
        await store.open()
        try:
            record = key(100_000_000)
            await store.create_key(record, TEST_EVENT)
            basis: dict[str, Any] = {
                "daily_cap_micros": record.daily_cap_micros,
                "total_cap_micros": None,
                "max_per_caller_micros": None,
                "expires_at": record.expires_at,
            }
            first = Patch("first", daily_cap_micros=200_000_000, expected=basis)
            assert await store.patch(record.key_id, first, NOW, TEST_EVENT) == "patched"
            racing = Patch("second", total_cap_micros=500_000_000, expected=basis)
            assert await store.patch(record.key_id, racing, NOW, TEST_EVENT) == "changed"
            view = await store.get_key(record.key_id, NOW)
            assert view is not None
            assert view.key.daily_cap_micros == 200_000_000 and view.key.total_cap_micros is None
            assert [change.reason for change in view.changes] == ["first"]
            later = {**basis, "daily_cap_micros": 200_000_000}
            again = Patch("second", total_cap_micros=500_000_000, expected=later)
            assert await store.patch(record.key_id, again, NOW, TEST_EVENT) == "patched"
        finally:
            await store.close()

    asyncio.run(run())
