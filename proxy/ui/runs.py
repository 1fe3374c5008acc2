"""What the dashboard shows of a run (a label): its spend against its cap, and its calls over
time. Computed from the store's views, so the numbers are the API's numbers.

The run's cap is the most its caps let it spend over its life, with the keys and budgets it has
now: the tightest bound that its keys' and budgets' caps, 24-hour and lifetime, put on its
lifetime spend, in the same money as its "Spent" figure and its cumulative spend chart.

- A key or budget is bounded by the tighter of its lifetime cap and its 24-hour cap counted once
  for each 24 hours (or part) of its life, from its creation to its expiry: no 24 hours of its
  life can spend more than the 24-hour cap, so a key living 2 hours with a $10 24-hour cap can
  spend $10 in all, and one living 3 days $30.
- Keys drawing on a budget are bounded together by the tighter of the budget's bound and the
  sum of theirs; a budget without live keys by its own bound (keys issued on it later draw on it).
- A revoked or expired key or budget spends no more: it counts what it spent (and holds in
  flight), whatever its caps. A run with nothing live (it ended) shows the caps it ran under.
- The run's cap is the sum over its budgets and the keys drawing on none; if any of them is
  unbounded (a live key with no cap and no capped budget), nothing caps the run.
"""

from __future__ import annotations

import math
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
    Usage,
)

__all__ = ["Point", "RunSummary", "Series", "cumulative", "summarise", "summary_of"]

DAY_SECONDS = 86_400
# What bounds a run, in the order the basis names them.
_KINDS = ("budget", "budget/24 h", "keys", "keys/24 h")


@dataclass(frozen=True, slots=True)
class RunSummary:
    label: str
    status: str  # live (a key or budget still usable), revoked (all revoked), ended
    spent_micros: int  # settled over the run's life, every key
    in_flight_micros: int  # reserved by calls still at the vendor
    cap_micros: int | None  # the most the run's caps let it spend over its life (None: uncapped)
    # Which caps make that bound, of "budget", "budget/24 h", "keys", "keys/24 h" (lifetime or
    # 24-hour caps, of budgets or keys), joined by " + "; None when nothing caps the run.
    cap_basis: str | None
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
        return min(100.0, 100.0 * self.spent_micros / self.cap_micros)


# A bound on spend and the caps that make it (empty: what a finished key or budget spent).
_Bound = tuple[int, frozenset[str]]


def _own_bound(
    daily: int | None, total: int | None, created: datetime, expires: datetime, kind: str
) -> _Bound | None:
    """The tighter of a lifetime cap and a 24-hour cap once per 24 hours (or part) of a life."""
    found: list[_Bound] = []
    if total is not None:
        found.append((total, frozenset({kind})))
    if daily is not None:
        days = max(1, math.ceil((expires - created).total_seconds() / DAY_SECONDS))
        found.append((daily * days, frozenset({f"{kind}/24 h"})))
    return min(found, key=lambda b: b[0], default=None)


def _spent(usage: Usage) -> _Bound:
    return usage.total_micros + usage.total_reserved_micros, frozenset()


def _tighter(a: _Bound | None, b: _Bound | None) -> _Bound | None:
    if a is None or b is None:
        return a or b
    return a if a[0] <= b[0] else b


def _sum(bounds: list[_Bound | None]) -> _Bound | None:
    if any(b is None for b in bounds):
        return None
    done = [b for b in bounds if b is not None]
    return sum(b[0] for b in done), frozenset().union(*(b[1] for b in done))


def _run_cap(
    keys: list[KeyView], budgets: list[BudgetView], now: datetime
) -> tuple[int | None, str | None]:
    """The run's cap and its basis, as the module's docstring defines them."""
    ended = all(v.key.status(now) != "active" for v in keys) and all(
        b.budget.status(now) != "active" for b in budgets
    )

    def key_bound(view: KeyView) -> _Bound | None:
        k = view.key
        if not ended and k.status(now) != "active":
            return _spent(view.usage)
        return _own_bound(
            k.daily_cap_micros, k.total_cap_micros, k.created_at, k.expires_at, "keys"
        )

    parts: list[_Bound | None] = []
    known = {b.budget.budget_id for b in budgets}
    for view in budgets:
        b = view.budget
        if not ended and b.status(now) != "active":
            parts.append(_spent(view.usage))  # its keys are refused now
            continue
        own = _own_bound(
            b.daily_cap_micros, b.total_cap_micros, b.created_at, b.expires_at, "budget"
        )
        members = [v for v in keys if v.key.budget_id == b.budget_id]
        if members and (ended or any(v.key.status(now) == "active" for v in members)):
            own = _tighter(own, _sum([key_bound(v) for v in members]))
        parts.append(own)
    parts += [key_bound(v) for v in keys if v.key.budget_id not in known]
    total = _sum(parts)
    if total is None:
        return None, None
    kinds = [kind for kind in _KINDS if kind in total[1]]
    return total[0], " + ".join(kinds) or None


def summarise(
    row: RunRow,
    keys: list[KeyView],
    budgets: list[BudgetView],
    last_call: datetime | None,
    now: datetime,
) -> RunSummary:
    """One run's numbers. Spend is the keys' (each call draws on one key; a budget's spend is
    the same calls again); the cap is `_run_cap`'s (the module's docstring)."""
    cap, basis = _run_cap(keys, budgets, now)
    if row.live:
        status = "live"
    elif row.revoked == row.keys + row.budgets:
        status = "revoked"
    else:
        status = "ended"
    return RunSummary(
        label=row.label,
        status=status,
        spent_micros=sum(v.usage.total_micros for v in keys),
        in_flight_micros=sum(v.usage.total_reserved_micros for v in keys),
        cap_micros=cap,
        cap_basis=basis,
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
    return summarise(row, keys, budgets, last[0].ts if last else None, now), keys, budgets


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
