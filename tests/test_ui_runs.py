"""The dashboard's run summary (proxy/ui/runs.py) without a store: a run's cap is the tightest
bound its keys' and budgets' caps, lifetime and 24-hour, put on its lifetime spend, whatever mix
of them it has."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keybrake.proxy.store.records import (
    BudgetRecord,
    BudgetView,
    KeyRecord,
    KeyView,
    RunRow,
    Usage,
)
from keybrake.proxy.ui.runs import summarise

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
USD = 1_000_000
LABEL = "argo/billing-agent-x7k2p"


def key(
    n: int,
    *,
    daily: float | None = None,
    total: float | None = None,
    budget: str | None = None,
    life: timedelta = timedelta(hours=2),
    spent: float = 0,
    revoked: bool = False,
) -> KeyView:
    created = NOW - timedelta(hours=1)
    record = KeyRecord(
        key_id=f"vk_{n:016d}",
        key_hash=bytes(32),
        vendor="stripe",
        label=LABEL,
        daily_cap_micros=None if daily is None else int(daily * USD),
        max_per_call_micros=None,
        allowed_endpoints=("POST /v1/payment_intents",),
        metadata={},
        dedupe_window_s=0,
        created_at=created,
        expires_at=created + life,
        revoked_at=NOW if revoked else None,
        total_cap_micros=None if total is None else int(total * USD),
        budget_id=budget,
    )
    micros = int(spent * USD)
    return KeyView(record, Usage(NOW, spent_micros=micros, total_micros=micros, calls=1))


def budget(
    budget_id: str,
    *,
    daily: float | None = None,
    total: float | None = None,
    life: timedelta = timedelta(hours=2),
    spent: float = 0,
    revoked: bool = False,
) -> BudgetView:
    created = NOW - timedelta(hours=1)
    record = BudgetRecord(
        budget_id=budget_id,
        label=LABEL,
        daily_cap_micros=None if daily is None else int(daily * USD),
        total_cap_micros=None if total is None else int(total * USD),
        metadata={},
        created_at=created,
        expires_at=created + life,
        revoked_at=NOW if revoked else None,
    )
    micros = int(spent * USD)
    return BudgetView(record, Usage(NOW, spent_micros=micros, total_micros=micros))


def cap(keys: list[KeyView], budgets: list[BudgetView]) -> tuple[float | None, str | None]:
    row = RunRow(LABEL, NOW, NOW, len(keys), len(budgets), len(keys) + len(budgets), 0)
    summary = summarise(row, keys, budgets, None, NOW)
    micros = summary.cap_micros
    return (None if micros is None else micros / USD), summary.cap_basis


DAYS = timedelta(days=3)


@pytest.mark.parametrize(
    ("keys", "budgets", "expected"),
    [
        # Budget caps only: the budget's lifetime cap, or its 24-hour cap once per day it lives.
        ([key(1, budget="bg_1")], [budget("bg_1", total=5)], (5, "budget")),
        ([key(1, budget="bg_1")], [budget("bg_1", daily=3)], (3, "budget/24 h")),
        ([key(1, budget="bg_1")], [budget("bg_1", daily=3, life=DAYS)], (9, "budget/24 h")),
        ([key(1, budget="bg_1")], [budget("bg_1", daily=3, total=5, life=DAYS)], (5, "budget")),
        # A budget with no keys yet caps the keys issued on it later.
        ([], [budget("bg_1", total=5)], (5, "budget")),
        # Keys' 24-hour caps only: each once for each 24 hours (or part) of its life.
        ([key(1, daily=10), key(2, daily=10)], [], (20, "keys/24 h")),
        ([key(1, daily=10, life=DAYS), key(2, daily=10)], [], (40, "keys/24 h")),
        # Keys' lifetime caps only.
        ([key(1, total=4), key(2, total=6)], [], (10, "keys")),
        # The mix that showed "no cap": a total-cap key and 24-hour-cap keys.
        ([key(1, total=10), key(2, daily=5), key(3, daily=5)], [], (20, "keys + keys/24 h")),
        # One key with both: the tighter over its life.
        ([key(1, daily=5, total=8, life=DAYS)], [], (8, "keys")),
        ([key(1, daily=5, total=8)], [], (5, "keys/24 h")),
        # Keys on a budget: the tighter of the budget and the sum of its keys.
        (
            [key(1, total=1, budget="bg_1"), key(2, total=1, budget="bg_1")],
            [budget("bg_1", total=5)],
            (2, "keys"),
        ),
        (
            [key(1, total=4, budget="bg_1"), key(2, budget="bg_1")],
            [budget("bg_1", total=5)],
            (5, "budget"),
        ),
        ([key(1, daily=2, budget="bg_1")], [budget("bg_1")], (2, "keys/24 h")),
        # A budget's keys and a key on no budget add up.
        (
            [key(1, budget="bg_1"), key(2, daily=2)],
            [budget("bg_1", total=5)],
            (7, "budget + keys/24 h"),
        ),
        # Nothing caps a key with no cap on no budget (or on an uncapped budget): no cap.
        ([key(1), key(2)], [], (None, None)),
        ([key(1, total=5), key(2)], [], (None, None)),
        ([key(1, budget="bg_1")], [budget("bg_1")], (None, None)),
        ([key(1, total=5, budget="bg_1"), key(2)], [budget("bg_1", total=5)], (None, None)),
        # A revoked key (one a retried issue step replaced) counts what it spent, not its cap.
        ([key(1, total=5), key(2, total=5, spent=1.5, revoked=True)], [], (6.5, "keys")),
        ([key(1, total=5), key(2, spent=1, revoked=True)], [], (6, "keys")),
        # A revoked budget's keys are refused: it counts what it spent.
        (
            [key(1, budget="bg_1", spent=3), key(2, total=2)],
            [budget("bg_1", total=5, spent=3, revoked=True)],
            (5, "keys"),
        ),
        # A run with nothing live shows the caps it ran under.
        ([key(1, total=5, spent=5, revoked=True)], [], (5, "keys")),
        (
            [key(1, budget="bg_1", revoked=True)],
            [budget("bg_1", daily=4, revoked=True)],
            (4, "budget/24 h"),
        ),
        (
            [key(1, total=2, revoked=True)],
            [budget("bg_1", total=5, revoked=True)],
            (7, "budget + keys"),
        ),
    ],
)
def test_the_run_cap_is_the_tightest_bound_of_every_mix(
    keys: list[KeyView], budgets: list[BudgetView], expected: tuple[float | None, str | None]
) -> None:
    assert cap(keys, budgets) == expected


def test_the_bar_is_lifetime_spend_against_that_cap() -> None:
    keys = [key(1, total=10, spent=3), key(2, daily=5, spent=2)]
    row = RunRow(LABEL, NOW, NOW, 2, 0, 2, 0)
    summary = summarise(row, keys, [], None, NOW)
    assert summary.spent_micros == 5 * USD and summary.cap_micros == 15 * USD
    assert summary.used_percent == pytest.approx(100 * 5 / 15)
    uncapped = summarise(row, [key(1, spent=3)], [], None, NOW)
    assert uncapped.cap_micros is None and uncapped.used_percent is None
