"""What the dashboard shows of a run (a label): its spend against its cap, and its calls over
time. Computed from the store's views, so the numbers are the API's numbers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from keybrake.proxy.store.protocol import Store
from keybrake.proxy.store.records import (
    AuditFilter,
    BudgetView,
    KeyView,
    Listing,
    RunActivity,
    RunRow,
    Scope,
)

__all__ = ["Point", "RunSummary", "Series", "cumulative", "summarise", "summary_of"]


@dataclass(frozen=True, slots=True)
class RunSummary:
    label: str
    status: str  # live (a key or budget still usable), revoked (all revoked), ended
    spent_micros: int  # settled over the run's life, every key
    in_flight_micros: int  # reserved by calls still at the vendor
    cap_micros: int | None  # what the run may spend (None: nothing caps it)
    cap_basis: str | None  # "budget" or "keys" (lifetime), "budget/24 h" or "keys/24 h"
    against_micros: int  # the spend counted against that cap
    calls: int
    cap_hits: int
    last_call: datetime | None
    newest: datetime
    oldest: datetime
    keys: int
    budgets: int
    live: int
    vendors: tuple[str, ...]

    @property
    def used_percent(self) -> float | None:
        """For the bar's width only; never a money figure."""
        if not self.cap_micros:
            return None
        return min(100.0, 100.0 * self.against_micros / self.cap_micros)


def summarise(
    row: RunRow, keys: list[KeyView], budgets: list[BudgetView], last_call: datetime | None
) -> RunSummary:
    """One run's numbers. Spend is the keys' (each call draws on one key; a budget's spend is
    the same calls again). The cap is the budgets' when the run has capped budgets, else the
    keys' when every key is capped; lifetime caps before 24-hour ones."""
    spent = sum(v.usage.total_micros for v in keys)
    in_flight = sum(v.usage.total_reserved_micros for v in keys)
    cap: int | None = None
    basis: str | None = None
    against = spent
    # A revoked key or budget (one a retried issue step replaced, say) caps nothing any more.
    live_budgets = [b for b in budgets if b.budget.revoked_at is None] or budgets
    capped_keys = [v for v in keys if v.key.revoked_at is None] or keys
    if live_budgets and all(b.budget.total_cap_micros is not None for b in live_budgets):
        cap = sum(b.budget.total_cap_micros or 0 for b in live_budgets)
        basis, against = "budget", sum(b.usage.total_micros for b in live_budgets)
    elif live_budgets and all(b.budget.daily_cap_micros is not None for b in live_budgets):
        cap = sum(b.budget.daily_cap_micros or 0 for b in live_budgets)
        basis, against = "budget/24 h", sum(b.usage.spent_micros for b in live_budgets)
    elif capped_keys and all(v.key.total_cap_micros is not None for v in capped_keys):
        cap = sum(v.key.total_cap_micros or 0 for v in capped_keys)
        basis = "keys"
    elif capped_keys and all(v.key.daily_cap_micros is not None for v in capped_keys):
        cap = sum(v.key.daily_cap_micros or 0 for v in capped_keys)
        basis, against = "keys/24 h", sum(v.usage.spent_micros for v in capped_keys)
    if row.live:
        status = "live"
    elif row.revoked == row.keys + row.budgets:
        status = "revoked"
    else:
        status = "ended"
    return RunSummary(
        label=row.label,
        status=status,
        spent_micros=spent,
        in_flight_micros=in_flight,
        cap_micros=cap,
        cap_basis=basis,
        against_micros=against,
        calls=sum(v.usage.calls for v in keys),
        cap_hits=sum(v.usage.cap_hits for v in keys),
        last_call=last_call,
        newest=row.newest,
        oldest=row.oldest,
        keys=row.keys,
        budgets=row.budgets,
        live=row.live,
        vendors=tuple(sorted({v.key.vendor for v in keys})),
    )


async def summary_of(
    store: Store, row: RunRow, scope: Scope | None, now: datetime
) -> tuple[RunSummary, list[KeyView], list[BudgetView]]:
    run = Listing(label=row.label, scope=scope, limit=10_000)
    keys, budgets = await store.list_keys(run, now), await store.list_budgets(run, now)
    last = await store.audit(AuditFilter(scope=scope, label=row.label, limit=1))
    return summarise(row, keys, budgets, last[0].ts if last else None), keys, budgets


@dataclass(frozen=True, slots=True)
class Point:
    at: datetime
    micros: int


@dataclass(frozen=True, slots=True)
class Series:
    """A run's calls over time, one point per time slice of the store's: cumulative spend and
    cap hits."""

    spend: list[Point]
    cap_hits: list[Point]  # micros holds a count here


def cumulative(activity: RunActivity) -> Series:
    """The store's time slices as cumulative spend (each point, drawn at its slice's start, the
    run's total once the slice is over, so the last is its whole audited spend) and cap hits
    per slice."""
    spend: list[Point] = []
    hits: list[Point] = []
    total = 0
    for at, spent, _calls, cap_hits in activity.seconds:
        total += spent
        spend.append(Point(at, total))
        hits.append(Point(at, cap_hits))
    return Series(spend, hits)
