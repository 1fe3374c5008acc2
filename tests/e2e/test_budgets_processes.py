"""One budget across the workers of one `keybrake serve --workers 2` process (SQLite): the
workers are processes, so this one needs `keybrake serve` itself."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import start_proxy
from tests.test_budgets import PI, blast, budget, info, key_on


def test_two_keys_on_one_300_budget_admit_exactly_300_of_500_calls_with_two_workers(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    proxy = start_proxy(tmp_path, stripe_base=fake_stripe.url, workers=2)
    try:
        run = budget(proxy, total_usd_cap=300)
        a = key_on(proxy, run["budget_id"], dedupe_window="0")
        b = key_on(proxy, run["budget_id"], daily_usd_cap=1000, dedupe_window="0")
        statuses = asyncio.run(
            blast([(proxy.url, a["vault_key"]), (proxy.url, b["vault_key"])], 500)
        )
        shown = info(proxy, f"/vault/budgets/{run['budget_id']}")
        rows = info(proxy, f"/vault/audit?budget_id={run['budget_id']}&limit=1000")["data"]
    finally:
        proxy.stop()
    assert statuses == {200: 300, 429: 200}
    assert fake_stripe.count("POST", PI) == 300
    assert (shown["total_spent_usd"], shown["reserved_usd"], shown["remaining_usd"]) == (
        "300.00",
        "0.00",
        "0.00",
    )
    assert shown["calls"] == 500 and shown["cap_hits"] == 200
    assert sorted(shown["keys"]) == sorted([a["key_id"], b["key_id"]])
    assert len(rows) == 500 and {r["budget_id"] for r in rows} == {run["budget_id"]}
    assert Counter(r["decision"] for r in rows) == {"forwarded": 300, "budget_cap_hit": 200}
