"""The admin API's views of what the store holds: keys, budgets, audit rows, issuers, events and
alert deliveries as the JSON models of `keybrake.proxy.models` (amounts in dollars, UTC times)."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from keybrake.proxy.access import Policy
from keybrake.proxy.constraints import Constraints
from keybrake.proxy.models import (
    AlertInfo,
    AuditRow,
    BudgetInfo,
    ChangeInfo,
    EventInfo,
    IssuerInfo,
    KeyInfo,
    KubernetesBinding,
)
from keybrake.proxy.money import format_ts, format_usd
from keybrake.proxy.store.records import (
    AlertDelivery,
    AuditRecord,
    BudgetRecord,
    BudgetView,
    Change,
    Event,
    IssuerRecord,
    KeyRecord,
    KeyView,
    Owner,
    Usage,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "alert_info",
    "audit_row",
    "budget_info",
    "event_info",
    "issuer_info",
    "key_info",
]


def _usd(micros: int | None) -> str | None:
    return None if micros is None else format_usd(micros)


def _ts(moment: datetime | None) -> str | None:
    return None if moment is None else format_ts(moment)


M = TypeVar("M", bound=BaseModel)


def _copied(model: type[M], record: DataclassInstance, **given: Any) -> M:
    """The `model` of the `record`'s fields that it names alike, and of `given` for the rest
    (renamed, in dollars, times as text); where both have a field, `given` wins."""
    shared = {
        f.name: getattr(record, f.name) for f in fields(record) if f.name in model.model_fields
    }
    return model(**{**shared, **given})


def _remaining(daily: int | None, total: int | None, usage: Usage) -> int | None:
    """Micro-dollars left before the first of these caps is reached (None: there is none)."""
    left = [
        cap - used
        for cap, used in (
            (daily, usage.spent_micros + usage.reserved_micros),
            (total, usage.total_micros + usage.total_reserved_micros),
        )
        if cap is not None
    ]
    return max(0, min(left)) if left else None


# Store field names, as the API names them.
_FIELDS = {
    "daily_cap_micros": "daily_usd_cap",
    "total_cap_micros": "total_usd_cap",
    "max_per_caller_micros": "max_usd_per_caller",
    "expires_at": "expires_at",
}


def _changes(changes: tuple[Change, ...]) -> list[ChangeInfo]:
    return [
        ChangeInfo(
            field=_FIELDS.get(c.field, c.field),
            old=c.old,
            new=c.new,
            reason=c.reason,
            at=format_ts(c.at),
        )
        for c in changes
    ]


def _owner_fields(owner: Owner | None) -> dict[str, str | None]:
    if owner is None:
        return {}
    return {
        "issuer_id": owner.issuer_id,
        "namespace": owner.namespace,
        "service_account": owner.service_account,
    }


def _lifetime(
    record: KeyRecord | BudgetRecord, usage: Usage, changes: tuple[Change, ...], now: datetime
) -> dict[str, Any]:
    """What keys and budgets show alike: label, status, caps, times, spend and changes."""
    return {
        "agent_run_label": record.label,
        "status": record.status(now),
        "daily_usd_cap": _usd(record.daily_cap_micros),
        "total_usd_cap": _usd(record.total_cap_micros),
        "metadata": record.metadata,
        **_owner_fields(record.owner),
        "created_at": format_ts(record.created_at),
        "expires_at": format_ts(record.expires_at),
        "revoked_at": _ts(record.revoked_at),
        "window_start": format_ts(usage.window_start),
        "spent_usd": format_usd(usage.spent_micros),
        "reserved_usd": format_usd(usage.reserved_micros),
        "total_spent_usd": format_usd(usage.total_micros),
        "calls": usage.calls,
        "cap_hits": usage.cap_hits,
        "alert_thresholds": _thresholds(record.alert_percents),
        "changes": _changes(changes),
        "constraints": _constraints(record.constraints),
    }


def key_info(view: KeyView, now: datetime) -> KeyInfo:
    key, usage = view.key, view.usage
    return KeyInfo(
        **_lifetime(key, usage, view.changes, now),
        key_id=key.key_id,
        vendor=key.vendor,
        max_usd_per_call=_usd(key.max_per_call_micros),
        max_usd_per_caller=_usd(key.max_per_caller_micros),
        budget_id=key.budget_id,
        allowed_endpoints=list(key.allowed_endpoints),
        dedupe_window_seconds=key.dedupe_window_s,
        allowed_accounts=list(key.allowed_accounts),
        remaining_usd=_usd(_remaining(key.daily_cap_micros, key.total_cap_micros, usage)),
    )


def _thresholds(percents: tuple[int, ...] | None) -> list[int] | None:
    return None if percents is None else list(percents)


def _constraints(constraints: Constraints | None) -> dict[str, Any] | None:
    return None if constraints is None else constraints.as_json()


def budget_info(view: BudgetView, now: datetime) -> BudgetInfo:
    budget, usage = view.budget, view.usage
    left = _remaining(budget.daily_cap_micros, budget.total_cap_micros, usage)
    return BudgetInfo(
        **_lifetime(budget, usage, view.changes, now),
        budget_id=budget.budget_id,
        remaining_usd=format_usd(left or 0),
        keys=list(view.key_ids),
    )


def audit_row(record: AuditRecord) -> AuditRow:
    return _copied(
        AuditRow,
        record,
        id=record.id or 0,
        ts=format_ts(record.ts),
        agent_run_label=record.label,
        reserved_usd=format_usd(record.reserved_micros),
        settled_usd=format_usd(record.settled_micros),
    )


def alert_info(item: AlertDelivery) -> AlertInfo:
    if item.delivered_at is not None:
        status = "delivered"
    else:
        status = "failing" if item.attempts else "pending"
    try:
        text = str(json.loads(item.payload).get("text", ""))
    except ValueError:
        text = ""
    return AlertInfo(
        delivery_id=item.delivery_id,
        subject_id=item.owner_id,
        mark=item.mark,
        status=status,
        created_at=format_ts(item.created_at),
        attempts=item.attempts,
        next_attempt_at=_ts(item.next_attempt_at),
        delivered_at=_ts(item.delivered_at),
        last_error=item.last_error,
        text=text,
    )


def issuer_info(record: IssuerRecord) -> IssuerInfo:
    policy = Policy.of(record)
    return IssuerInfo(
        issuer_id=record.issuer_id,
        name=record.name,
        status="deleted" if record.deleted_at else "active",
        label_prefix=policy.label_prefix,
        allowed_vendors=list(policy.allowed_vendors),
        allowed_endpoints=[str(e) for e in policy.allowed_endpoints],
        max_daily_usd_cap=_usd(policy.max_daily_micros),
        max_total_usd_cap=_usd(policy.max_total_micros),
        max_expires_in=policy.max_expires_in,
        max_active_keys=policy.max_active_keys,
        may_issue=policy.may_issue,
        kubernetes=KubernetesBinding(**record.kubernetes) if record.kubernetes else None,
        static_token=record.token_hash is not None,
        created_at=format_ts(record.created_at),
        deleted_at=_ts(record.deleted_at),
        constraints=_constraints(policy.constraints),
        allowed_accounts=None if policy.allowed_accounts is None else list(policy.allowed_accounts),
    )


def event_info(event: Event) -> EventInfo:
    return _copied(EventInfo, event, id=event.id or 0, ts=format_ts(event.ts))
