"""The store's interface: every operation the proxy, the CLI and the dashboard run on the
database. `keybrake.proxy.store.sql.SQLStore` implements all but the ledger once for both
backends; each backend adds its driver and its ledger (reserve, settle, sweep)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

from keybrake.proxy.decisions import Decision
from keybrake.proxy.store import records

__all__ = ["Store"]


class Store(Protocol):
    """Every admin write takes the `Event` that records it and writes it in the same
    transaction: an action that happened is never missing from the record."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def create_key(
        self,
        key: records.KeyRecord,
        event: records.Event,
        *,
        max_active: int | None = None,
        request: records.IssueRequest | None = None,
    ) -> records.Issued:
        """Insert the key. `max_active`: refuse ("too_many") if its issuer already has that many
        active keys. `request`: an earlier issue under the same idempotency key is revoked and
        replaced, a different request under it refused ("mismatch"). All in one transaction."""
        ...

    async def find_key(self, key_hash: bytes) -> records.KeyRecord | None: ...

    async def get_key(self, key_id: str, now: datetime) -> records.KeyView | None: ...

    async def list_keys(self, query: records.Listing, now: datetime) -> list[records.KeyView]: ...

    async def revoke_key(self, key_id: str, now: datetime, event: records.Event) -> bool | None: ...

    async def revoke_label(
        self,
        label: str,
        now: datetime,
        event: records.Event,
        *,
        namespace: str | None = None,
        workflow_uid: str | None = None,
        cluster: str | None = None,
        scope: records.Scope | None = None,
    ) -> tuple[list[str], list[str]]:
        """Revoke the label's live keys and budgets (of `namespace`, of the run whose metadata
        `uid` is `workflow_uid` and `cluster` is `cluster`, within `scope`, when given); their
        ids (keys, budgets). Only
        what this call changed is returned and recorded (`revoked_event`), so of two callers
        racing to revoke a run, exactly one records each key."""
        ...

    async def create_budget(
        self,
        budget: records.BudgetRecord,
        event: records.Event,
        *,
        request: records.IssueRequest | None = None,
    ) -> records.Issued: ...

    async def get_budget(self, budget_id: str, now: datetime) -> records.BudgetView | None: ...

    async def list_budgets(
        self, query: records.Listing, now: datetime
    ) -> list[records.BudgetView]: ...

    async def revoke_budget(
        self, budget_id: str, now: datetime, event: records.Event
    ) -> list[str] | None:
        """Revoke the budget and every live key drawing on it; those keys' ids, None if there
        is no such budget."""
        ...

    async def patch(
        self, subject_id: str, patch: records.Patch, now: datetime, event: records.Event
    ) -> str:
        """Apply `patch` to a live key (`vk_...`) or budget (`bg_...`) and record each change:
        "patched", "unknown", or "not_live" (revoked or expired: nothing changed)."""
        ...

    async def create_issuer(self, issuer: records.IssuerRecord, event: records.Event) -> None: ...

    async def get_issuer(self, issuer_id: str) -> records.IssuerRecord | None: ...

    async def find_issuer(self, token_hash: bytes) -> records.IssuerRecord | None:
        """The live issuer whose token has this hash."""
        ...

    async def list_issuers(
        self, *, include_deleted: bool = False
    ) -> list[records.IssuerRecord]: ...

    async def delete_issuer(
        self, issuer_id: str, now: datetime, event: records.Event, *, revoke: bool = False
    ) -> tuple[list[str], list[str]] | None:
        """Delete the issuer (its token stops at once); with `revoke`, revoke its live keys and
        budgets too: their ids (keys, budgets). None if there is no such live issuer."""
        ...

    async def record_event(self, event: records.Event) -> None:
        """Record an action that changed nothing (a refusal, a refused login)."""
        ...

    async def events(self, query: records.EventFilter) -> list[records.Event]: ...

    async def compact_spend(self, before_bucket: int) -> int:
        """Fold each owner's spend buckets older than `before_bucket` into its bucket 0, which
        only lifetime totals count: the rows a reservation sums stay few however long a key or
        budget lives."""
        ...

    async def reserve(self, reservation: records.Reservation) -> records.Admission: ...

    async def settle(self, settlement: records.Settlement) -> None: ...

    async def record(self, row: records.AuditRecord) -> int: ...

    async def forget_replays(self, older_than: datetime) -> int:
        """Drop replay tokens (idempotency keys, dedupe fingerprints) created before
        `older_than`, answered or not, so the replay table does not grow without end."""
        ...

    async def sweep(self, older_than: datetime) -> int:
        """Reservations still in flight since before `older_than` belong to a process that died:
        count them as spent (the vendor may have moved the money) and mark them `reconciled`.
        A late settle of such a call corrects spend to its real outcome."""
        ...

    async def check_lookup(
        self, key: records.KeyRecord, now: datetime
    ) -> tuple[Decision, int] | None:
        """`admit_lookup` for a key whose cached record (and its budget's) has no call rate: a
        read, nothing counted (rules 0 and 1)."""
        ...

    async def admit_lookup(
        self, key: records.KeyRecord, now: datetime
    ) -> tuple[Decision, int] | None:
        """Whether the proxy may look something up at a vendor with the real key for a call of
        `key` now (None, and the lookup is counted in the call rates), or why not and the
        seconds to wait: `policy_changed`, a dead key or budget, `rate_limited` (rules 0, 1 and
        8 of `keybrake.proxy.decisions`)."""
        ...

    async def alert_levels(self, now: datetime) -> list[records.AlertLevel]:
        """Every live key and budget with a cap, and its spend against it."""
        ...

    async def alert_marks(self) -> set[tuple[str, str]]:
        """(owner, mark) of every alert raised and not re-armed."""
        ...

    async def raise_alert(self, delivery: records.AlertDelivery) -> bool:
        """Mark the alert raised and put it in the outbox, in one transaction; False (and
        nothing written) when it already was: of replicas scanning together, one raises it."""
        ...

    async def forget_alert_marks(self, ended_before: datetime) -> int:
        """Drop the raised marks of keys and budgets revoked or expired before `ended_before`
        (they alert no more); how many."""
        ...

    async def rearm_alerts(self, owner_id: str, marks: list[str]) -> None:
        """Spend fell back below these thresholds: they may alert again."""
        ...

    async def claim_alerts(
        self, now: datetime, lease: timedelta, limit: int
    ) -> list[records.AlertDelivery]:
        """Due, undelivered alerts, each claimed for `lease` so one replica sends it at a time."""
        ...

    async def finish_alert(
        self,
        delivery_id: str,
        now: datetime,
        *,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        """An attempt's outcome: delivered (`error` None), or to be retried at `retry_at`."""
        ...

    async def alert_deliveries(self, *, pending: bool, limit: int) -> list[records.AlertDelivery]:
        """The outbox, newest first (`pending`: only those not yet delivered)."""
        ...

    async def metrics_snapshot(
        self, now: datetime, stale_before: datetime
    ) -> records.MetricsSnapshot:
        """What /metrics reads from the database, so every worker and replica reports the same:
        bounded by vendor, never one series per run."""
        ...

    async def audit(self, query: records.AuditFilter) -> list[records.AuditRecord]: ...

    async def list_runs(self, query: records.RunFilter, now: datetime) -> list[records.RunRow]:
        """Labels of keys and budgets, newest first, one page (the dashboard's runs)."""
        ...

    async def run_activity(
        self, label: str, scope: records.Scope | None, points: int = records.ACTIVITY_POINTS
    ) -> records.RunActivity:
        """The run's audit rows summed per time slice (at most about `points`) and per caller
        tag."""
        ...

    async def create_session(self, session: records.Session) -> None: ...

    async def find_session(self, session_hash: bytes, now: datetime) -> records.Session | None:
        """The session, if it exists and has not expired."""
        ...

    async def end_session(self, session_hash: bytes) -> None: ...

    async def forget_sessions(self, now: datetime) -> int:
        """Delete expired sessions; how many."""
        ...

    async def prune_audit(self, before: datetime, now: datetime, *, dry_run: bool = False) -> int:
        """Delete (or count) audit rows older than `before`, except rows of a call still in
        flight and rows of keys that are active or ended less than a window (plus the window's
        last bucket) ago. Returns how many rows were (or would be) removed."""
        ...
