"""The path of one vendor call through the proxy, top to bottom:

    authenticate → scope → estimate → reserve → forward → settle → audit

Every call that reaches `Pipeline.handle` leaves exactly one audit row, written durably before the
reply is returned. Nothing here knows a particular vendor: vendor specifics live behind
`keybrake.proxy.vendors.base.Vendor`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from time import perf_counter
from typing import Any

from keybrake.proxy.decisions import REFUSALS
from keybrake.proxy.endpoints import allows, compile_patterns, safe_path
from keybrake.proxy.errors import StoreUnavailable
from keybrake.proxy.metrics import Metrics
from keybrake.proxy.money import utc_day
from keybrake.proxy.pricing import Unpriceable
from keybrake.proxy.store.base import (
    AuditRecord,
    KeyRecord,
    Reservation,
    Settlement,
    Store,
    StoredResponse,
)
from keybrake.proxy.upstream import HOP_BY_HOP, Upstream, UpstreamError
from keybrake.proxy.vendors.base import Vendor, VendorCall

__all__ = ["CAP_HIT_HEADER", "Incoming", "LookupFailed", "Pipeline", "Reply", "hash_vault_key"]

CAP_HIT_HEADER = "X-Keybrake-Cap-Hit"
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


def hash_vault_key(vault_key: str) -> bytes:
    # Vault keys are 256-bit random tokens, so a fast hash is as good as a slow one here.
    return hashlib.sha256(vault_key.encode()).digest()


def split_presented_key(presented: str) -> tuple[str, str | None]:
    """`<vault_key>.<tag>` → (vault_key, tag); vault keys never contain a dot."""
    key, dot, tag = presented.partition(".")
    if dot and _TAG.match(tag):
        return key, tag
    return presented, None


@dataclass(slots=True)
class Incoming:
    vendor: str
    method: str
    path: str  # raw path after the /{vendor} prefix
    query: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    too_large: bool = False


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class _KeyCache:
    """Immutable key facts by hash. Revocation and expiry are re-read inside `reserve`."""

    def __init__(self, store: Store, size: int = 10_000) -> None:
        self._store = store
        self._size = size
        self._keys: dict[bytes, KeyRecord] = {}

    async def find(self, key_hash: bytes) -> KeyRecord | None:
        key = self._keys.get(key_hash)
        if key is None:
            key = await self._store.find_key(key_hash)
            if key is not None:
                if len(self._keys) >= self._size:
                    self._keys.pop(next(iter(self._keys)))
                self._keys[key_hash] = key
        return key


class _Lookup:
    """What a vendor's estimate may consult: the store, and the vendor with the real credential."""

    def __init__(self, pipeline: Pipeline, vendor: Vendor) -> None:
        self._pipeline = pipeline
        self._vendor = vendor

    async def is_counted(self, object_id: str) -> bool:
        return await self._pipeline.store.is_counted(self._vendor.name, object_id)

    async def fetch_json(self, path: str) -> Mapping[str, Any]:
        vendor = self._vendor
        call = VendorCall("GET", path.partition("?")[0], path.partition("?")[2], {}, b"")
        target, auth = vendor.upstream_request(call)
        try:
            response = await self._pipeline.upstream.send(
                "GET", vendor.credentials.base_url + target, auth, None
            )
        except UpstreamError as exc:
            raise LookupFailed(str(exc)) from exc
        if response.status != 200:
            raise LookupFailed(f"GET {call.path} answered {response.status}")
        try:
            data = json.loads(response.body)
        except ValueError as exc:
            raise LookupFailed(f"GET {call.path} did not return JSON") from exc
        if not isinstance(data, dict):
            raise LookupFailed(f"GET {call.path} did not return an object")
        return data


class LookupFailed(Exception):
    pass


class Pipeline:
    def __init__(
        self,
        *,
        store: Store,
        vendors: Mapping[str, Vendor],
        upstream: Upstream,
        clock: Callable[[], datetime],
        metrics: Metrics,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.vendors = vendors
        self.upstream = upstream
        self.clock = clock
        self._keys = _KeyCache(store)

    async def handle(self, incoming: Incoming) -> Reply:
        started = perf_counter()
        now = self.clock()
        vendor = self.vendors.get(incoming.vendor)
        if vendor is None:
            reply = _plain(404, f"no vendor {incoming.vendor!r} is configured on this proxy")
            await self.store.record(
                AuditRecord(
                    now,
                    incoming.vendor[:64],
                    incoming.method,
                    incoming.path[:2048],
                    404,
                    "unknown_vendor",
                )
            )
            self.metrics.count_call("unknown", "unknown_vendor")
            return reply
        audit = AuditRecord(
            ts=now,
            vendor=vendor.name,
            method=incoming.method,
            path=incoming.path[:2048],
            status=0,
            decision="",
            idempotency_key=_idempotency_key(vendor, incoming.headers),
        )
        try:
            reply = await self._handle(vendor, incoming, audit, started)
        except StoreUnavailable:
            # Fail closed: without the database nothing is reserved, so nothing is forwarded.
            audit.decision = "store_unavailable"
            reply = self._refusal(vendor, "store_unavailable")
        self.metrics.count_call(vendor.name, audit.decision)
        return reply

    async def _handle(
        self, vendor: Vendor, incoming: Incoming, audit: AuditRecord, started: float
    ) -> Reply:
        now = audit.ts
        path = safe_path(incoming.path)
        if path is None:
            return await self._refuse(vendor, audit, "bad_path")
        if incoming.too_large:
            return await self._refuse(vendor, audit, "too_large")
        call = VendorCall(incoming.method, path, incoming.query, incoming.headers, incoming.body)

        # authenticate
        presented = vendor.presented_key(incoming.headers)
        if not presented:
            return await self._refuse(vendor, audit, "no_key")
        vault_key, audit.caller_tag = split_presented_key(presented)
        # Looked up by its SHA-256: the stored hash is never compared with what a caller sent.
        key = await self._keys.find(hash_vault_key(vault_key))
        if key is None:
            return await self._refuse(vendor, audit, "unknown_key")
        audit.key_id, audit.label = key.key_id, key.label
        if key.vendor != vendor.name:
            return await self._refuse(vendor, audit, "wrong_vendor")
        if key.expires_at <= now:
            return await self._refuse(vendor, audit, "expired")

        # scope
        if not allows(compile_patterns(key.allowed_endpoints), call.method, path):
            return await self._refuse(vendor, audit, "endpoint_denied", ep=f"{call.method} {path}")

        # estimate
        try:
            cost = await vendor.estimate(call, _Lookup(self, vendor))
        except Unpriceable as exc:
            return await self._refuse(vendor, audit, "unpriceable", reason=str(exc))
        except LookupFailed as exc:
            return await self._refuse(vendor, audit, "lookup_failed", reason=str(exc))

        # reserve (one transaction: revocation, idempotency, dedupe, cap)
        reservation = Reservation(
            key=key,
            now=now,
            day=utc_day(now),
            vendor=vendor.name,
            method=call.method,
            path=path,
            caller_tag=audit.caller_tag,
            cost_micros=cost.micros,
            amount=cost.amount,
            currency=cost.currency,
            priced=cost.priced,
            idempotency_key=audit.idempotency_key,
            request_hash=_request_hash(call),
        )
        timed = perf_counter()
        admission = await self.store.reserve(reservation)
        self.metrics.time_database("reserve", perf_counter() - timed)
        audit.decision = admission.decision
        if admission.replay is not None:
            return _replayed(admission.replay, admission.decision)
        if admission.decision != "forwarded":
            return self._refusal(vendor, admission.decision)

        # forward
        target, auth = vendor.upstream_request(call)
        headers = [(k, v) for k, v in incoming.headers.items() if k not in HOP_BY_HOP]
        headers.extend(auth.items())
        status: int | None
        timed = perf_counter()
        try:
            response = await self.upstream.send(
                call.method, vendor.credentials.base_url + target, headers, call.body
            )
            self.metrics.time_upstream(vendor.name, perf_counter() - timed)
            status, reply_body = response.status, response.body
            shown_headers, shown_body = vendor.workload_reply(
                call, response.status, response.headers, response.body
            )
            reply = Reply(response.status, shown_headers, shown_body)
        except UpstreamError as exc:
            status, reply_body = None, b""
            reply = self._refusal(vendor, "upstream_error", reason=f"{exc}.")

        # settle and audit, durably, before answering
        actual = vendor.settle(call, cost, status, reply_body)
        keep = status is not None and status < 500
        audit.decision = "forwarded" if status is not None else "upstream_error"
        timed = perf_counter()
        await self.store.settle(
            Settlement(
                audit_id=admission.audit_id,
                key_id=key.key_id,
                day=reservation.day,
                vendor=vendor.name,
                reserved_micros=cost.micros,
                settled_micros=actual.micros,
                status=reply.status,
                decision=audit.decision,
                vendor_request_id=vendor.request_id(_lower(reply.headers)) if status else None,
                latency_ms=round((perf_counter() - started) * 1000, 3),
                idempotency_key=reservation.idempotency_key,
                request_hash=reservation.request_hash,
                dedupe=cost.priced and key.dedupe_window_s > 0,
                response=StoredResponse(reply.status, reply.headers, reply.body) if keep else None,
                counts=actual.counts if status is not None and status < 300 else (),
            )
        )
        self.metrics.time_database("settle", perf_counter() - timed)
        return reply

    async def _refuse(
        self, vendor: Vendor, audit: AuditRecord, decision: str, **details: str
    ) -> Reply:
        reply = self._refusal(vendor, decision, **details)
        audit.status, audit.decision = reply.status, decision
        await self.store.record(audit)
        return reply

    def _refusal(self, vendor: Vendor, decision: str, **details: str) -> Reply:
        status, code, message = REFUSALS[decision]
        body, headers = vendor.error(status, code, message.format(**details))
        out = [("content-type", "application/json"), *headers.items()]
        if status == 429:
            out.append((CAP_HIT_HEADER, "true"))
        return Reply(status, out, body)


def _idempotency_key(vendor: Vendor, headers: Mapping[str, str]) -> str | None:
    if vendor.idempotency_header is None:
        return None
    value = headers.get(vendor.idempotency_header)
    return value[:255] if value else None


def _request_hash(call: VendorCall) -> str:
    digest = hashlib.sha256()
    for part in (call.method.encode(), call.path.encode(), call.query.encode(), call.body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _lower(headers: list[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers}


def _replayed(stored: StoredResponse, decision: str) -> Reply:
    headers = [*stored.headers, ("X-Keybrake-Replayed", decision)]
    return Reply(stored.status, headers, stored.body)


def _plain(status: int, message: str) -> Reply:
    body = json.dumps({"error": {"type": "not_found", "message": message}}).encode()
    return Reply(status, [("content-type", "application/json")], body)
