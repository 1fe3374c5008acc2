"""The path of one vendor call through the proxy, top to bottom:

    read → authenticate → check body → scope → estimate → reserve → forward → settle → audit

Every call that reaches `Pipeline.handle` leaves exactly one audit row, written durably before the
reply is returned. A refusal before the reservation forwards nothing and is recorded at once; from
the reservation on, the call runs in a task of its own that the client cannot cancel by hanging
up: a call that reached the vendor is always settled with its real outcome and request id.
Nothing here knows a particular vendor: vendor specifics live behind
`keybrake.proxy.vendors.base.Vendor`, and the ledger's rules in `keybrake.proxy.decisions`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from time import perf_counter
from typing import Any

from keybrake.proxy.access import hash_vault_key
from keybrake.proxy.constraints import Found, Unchecked
from keybrake.proxy.decisions import (
    Decision,
    bucket_of,
    caller_of,
    is_cap_hit,
    refusal,
    second_of,
)
from keybrake.proxy.endpoints import allows, compile_patterns, safe_path
from keybrake.proxy.errors import (
    AmbiguousRequest,
    EstimateError,
    LookupFailed,
    SchemaNewer,
    StoreUnavailable,
    UpstreamError,
)
from keybrake.proxy.metrics import Metrics
from keybrake.proxy.redact import redact
from keybrake.proxy.store.protocol import Store
from keybrake.proxy.store.records import (
    Admission,
    AuditRecord,
    KeyRecord,
    Owner,
    Reservation,
    Settlement,
    StoredResponse,
)
from keybrake.proxy.upstream import HOP_BY_HOP, Upstream, UpstreamResponse
from keybrake.proxy.vendors.base import Cost, Vendor, VendorCall

__all__ = [
    "CAP_HIT_HEADER",
    "CODE_HEADER",
    "RATE_LIMITED_HEADER",
    "Incoming",
    "LookupFailed",
    "Pipeline",
    "Reply",
    "hash_vault_key",
]

CAP_HIT_HEADER = "X-Keybrake-Cap-Hit"
CODE_HEADER = "X-Keybrake-Code"  # on every answer keybrake gives itself: its code
RATE_LIMITED_HEADER = "X-Keybrake-Rate-Limited"  # a call rate is full: wait Retry-After
_KEPT = frozenset({Decision.FORWARDED, Decision.VENDOR_REPLAYED})  # answers stored for replays
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,252}")
log = logging.getLogger("keybrake.proxy")


def split_presented_key(presented: str) -> tuple[str, str | None]:
    """`<vault_key>.<tag>` → (vault_key, tag); vault keys never contain a dot."""
    key, dot, tag = presented.partition(".")
    if dot and _TAG.fullmatch(tag):
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
    body_timeout: float | None = None  # seconds the body was given, when it did not arrive


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class _Refused(Exception):
    """A refusal before the reservation: nothing was forwarded."""

    def __init__(self, decision: Decision, **details: str) -> None:
        super().__init__(decision)
        self.decision = decision
        self.details = details


# What `Store.admit_lookup` refuses a lookup for, read from the database itself.
_LEDGER_REFUSALS = frozenset(
    {
        Decision.RATE_LIMITED,
        Decision.REVOKED,
        Decision.EXPIRED,
        Decision.BUDGET_REVOKED,
        Decision.BUDGET_EXPIRED,
    }
)

# An audit row's note for a report-only constraint that could not be checked (`_Looked`): not a
# would-be refusal, so not counted as one.
_UNCHECKED = "constraint_unchecked"


class _PolicyChanged(Exception):
    """The ledger found the key's or its budget's constraints newer than those the call was
    judged against (decisions, rule 0): nothing was reserved; judge it again."""


class _KeyCache:
    """Key facts by hash. Revocation, expiry and caps are re-read inside `reserve`; constraints
    are cached with their revision, which `reserve` compares (a patch raises it)."""

    def __init__(self, store: Store, size: int = 10_000) -> None:
        self._store = store
        self._size = size
        self._keys: dict[bytes, KeyRecord] = {}

    async def changed(self, key: KeyRecord) -> bool:
        """Whether the key's or its budget's constraints changed since `key` was read (the
        cache then holds the new ones)."""
        fresh = await self.find(key.key_hash, fresh=True)
        return fresh is None or (fresh.policy_rev, fresh.budget_policy_rev) != (
            key.policy_rev,
            key.budget_policy_rev,
        )

    async def find(self, key_hash: bytes, *, fresh: bool = False) -> KeyRecord | None:
        key = None if fresh else self._keys.get(key_hash)
        if key is None:
            self._keys.pop(key_hash, None)
            key = await self._store.find_key(key_hash)
            if key is not None:
                if len(self._keys) >= self._size:
                    self._keys.pop(next(iter(self._keys)))
                self._keys[key_hash] = key
        return key


def _unreadable(exc: EstimateError) -> _Refused:
    """The refusal of a body or object the proxy cannot read the vendor's one way (while pricing
    a call, or reading its constrained fields): never guessed at."""
    if isinstance(exc, AmbiguousRequest):
        return _Refused(Decision.AMBIGUOUS, reason=str(exc))
    if isinstance(exc, LookupFailed):
        return _Refused(Decision.LOOKUP_FAILED, reason=str(exc))
    return _Refused(Decision.UNPRICEABLE, reason=str(exc))


@dataclass(slots=True)
class _Lookup:
    """What a vendor's estimate may consult: the vendor with the real credential, on the same
    account the call acts on. A dead key reaches no vendor: before each lookup the ledger reads
    the key's (and its budget's) life and constraints' revision and counts the lookup in their
    call rates (`Store.admit_lookup`; a read, `check_lookup`, for a key without one), so a
    revoked or expired key learns nothing and spends none of the account's rate limit. Only
    calls that look something up pay for that."""

    pipeline: Pipeline
    vendor: Vendor
    call: VendorCall
    key: KeyRecord
    # What this call looked up, by path: the price and the constraints read one object once.
    # (Made at the first lookup: most calls look nothing up.)
    fetched: dict[str, Mapping[str, Any]] | None = None

    async def fetch_json(self, path: str) -> Mapping[str, Any]:
        if self.fetched is None:
            self.fetched = {}
        known = self.fetched.get(path)
        if known is None:
            known = self.fetched[path] = await self._fetch(path)
        return known

    async def _fetch(self, path: str) -> Mapping[str, Any]:
        pipeline, key, vendor = self.pipeline, self.key, self.vendor
        # A lookup reaches the vendor too: it takes a place in the call rates the database
        # holds now, and only for a key alive and judged by its current constraints.
        admit = pipeline.store.admit_lookup if _rated(key) else pipeline.store.check_lookup
        refused = await admit(key, pipeline.clock())
        if refused is not None:
            decision, wait = refused
            if decision is Decision.POLICY_CHANGED:
                raise _PolicyChanged()
            if decision is Decision.RATE_LIMITED:
                raise _Refused(decision, retry_after=str(wait))
            raise _Refused(decision)
        where, _, query = path.partition("?")
        sent = self.call.headers
        headers = {h: sent[h] for h in vendor.account_headers if h in sent}
        call = VendorCall("GET", where, query, headers, b"")
        target, auth = vendor.upstream_request(call)
        try:
            response = await pipeline.upstream.send(
                "GET", vendor.credentials.base_url + target, {**headers, **auth}, None
            )
        except UpstreamError as exc:
            raise LookupFailed(str(exc)) from exc
        if response.status != 200:
            raise LookupFailed(f"GET {where} answered {response.status}")
        try:
            data = json.loads(response.body)
        except (ValueError, RecursionError) as exc:
            raise LookupFailed(f"GET {where} did not return JSON") from exc
        if not isinstance(data, dict):
            raise LookupFailed(f"GET {where} did not return an object")
        return data


@dataclass(slots=True)
class _Looked:
    """What report-only constraints read of the objects a call acts on: those its price or its
    enforced constraints looked up already (`_Lookup.fetched`); any other is `Unchecked`."""

    lookup: _Lookup

    async def fetch_json(self, path: str) -> Mapping[str, Any]:
        fetched = self.lookup.fetched
        known = None if fetched is None else fetched.get(path)
        if known is None:
            raise Unchecked()
        return known


@dataclass(slots=True)
class _Call:
    """One call once it is admitted: what the forward and settle stages need."""

    vendor: Vendor
    call: VendorCall
    key: KeyRecord
    cost: Cost
    audit: AuditRecord
    started: float
    idempotency_key: str | None  # as the caller sent it (`_idempotency_key`)
    report: str | None = None  # what a report-only constraint would have refused it for
    reservation: Reservation = field(init=False)


@dataclass(eq=False, kw_only=True)
class Pipeline:
    """The request path: each vendor call read, admitted, forwarded and settled (`handle`)."""

    store: Store
    vendors: Mapping[str, Vendor]
    upstream: Upstream
    clock: Callable[[], datetime]
    metrics: Metrics
    _keys: _KeyCache = field(init=False)
    # Admitted calls run as tasks of their own, so a client that hangs up cannot stop one
    # between its reservation and its settlement; held here until they end (the event loop
    # keeps only weak references to tasks), which is what `drain` waits for.
    _admitted: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _schema_logged: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._keys = _KeyCache(self.store)

    async def handle(self, incoming: Incoming) -> Reply:
        started = perf_counter()
        vendor = self.vendors.get(incoming.vendor)
        # Whatever a caller sends, no secret reaches the audit log (a key pasted into a path);
        # the path is read for secrets once, here, and refused in `_read` if it held one.
        path = redact(incoming.path)
        audit = AuditRecord(
            ts=self.clock(),
            vendor=(vendor.name if vendor else redact(incoming.vendor[:64])),
            method=incoming.method[:16],
            path=path[:2048],
            status=0,
            decision="",
        )
        try:
            if vendor is None:
                return await self._unknown_vendor(incoming, audit)
            try:
                secret_in_path = path != incoming.path
                return await self._handle(vendor, incoming, audit, started, secret_in_path)
            except _Refused as refused:
                reply = self._refusal(vendor, refused.decision, **refused.details)
                audit.status, audit.decision = reply.status, refused.decision
                if audit.key_id is None:
                    await self._attribute(vendor, incoming, audit)
                await self.store.record(audit)
                self.metrics.count_call(vendor.name, audit.decision)
                return reply
            except Exception:
                # A bug, not an input: logged with its traceback for us, never shown to the
                # caller. Nothing was forwarded (calls past the reservation settle themselves).
                log.exception("vendor call %s %s failed", incoming.method, audit.path[:200])
                reply = self._refusal(vendor, Decision.INTERNAL_ERROR)
                audit.status, audit.decision = reply.status, Decision.INTERNAL_ERROR
                await self.store.record(audit)
                self.metrics.count_call(vendor.name, audit.decision)
                return reply
        except StoreUnavailable as exc:
            # Fail closed: without the database nothing is reserved, so nothing is forwarded.
            self._log_newer_schema(exc)
            self.metrics.count_call(audit.vendor, Decision.STORE_UNAVAILABLE)
            return self._refusal(vendor, Decision.STORE_UNAVAILABLE)

    def _log_newer_schema(self, exc: StoreUnavailable) -> None:
        """Say once, loudly, why a replica left behind by an upgrade refuses every call."""
        if isinstance(exc, SchemaNewer) and not self._schema_logged:
            self._schema_logged = True
            log.error("%s (docs/deploy.md: upgrading)", exc)

    async def _handle(
        self,
        vendor: Vendor,
        incoming: Incoming,
        audit: AuditRecord,
        started: float,
        secret_in_path: bool,
    ) -> Reply:
        if secret_in_path:
            raise _Refused(Decision.SECRET_IN_REQUEST, where="path")
        call = self._read(incoming)
        idempotency_key = _idempotency_key(vendor, call.headers)
        if idempotency_key and redact(idempotency_key) != idempotency_key:
            raise _Refused(Decision.SECRET_IN_REQUEST, where="idempotency key")
        key = await self._authenticate(vendor, call, audit)
        self._check_body(incoming)
        try:
            return await self._admit(vendor, call, key, audit, started, idempotency_key)
        except _PolicyChanged:
            pass
        # The key's or its budget's constraints were patched since this process read them: read
        # them again and judge the call again, from its scope on. Twice stale (patched again
        # meanwhile) is a refusal the caller may retry.
        key = await self._authenticate(vendor, call, audit, fresh=True)
        try:
            return await self._admit(vendor, call, key, audit, started, idempotency_key)
        except _PolicyChanged:
            raise _Refused(Decision.POLICY_CHANGED) from None

    async def _admit(
        self,
        vendor: Vendor,
        call: VendorCall,
        key: KeyRecord,
        audit: AuditRecord,
        started: float,
        idempotency_key: str | None,
    ) -> Reply:
        self._scope(vendor, key, call)
        lookup = _Lookup(self, vendor, call, key)
        cost = await self._estimate(vendor, call, lookup)
        report = None
        if key.constraints is not None or key.budget_constraints is not None:
            try:
                report = await self._constrain(vendor, call, key, cost, lookup)
            except _Refused as refused:
                # Refused by constraints this process holds: only if they are still the key's
                # (a patch that widened them must not leave a replica refusing by the old ones).
                # A lookup's refusal by the ledger (a dead key, a full rate) is the database's.
                by_ledger = refused.decision in _LEDGER_REFUSALS
                if not by_ledger and await self._keys.changed(key):
                    raise _PolicyChanged() from None
                raise
        admitted = _Call(vendor, call, key, cost, audit, started, idempotency_key, report)
        # From here on the call must finish even if the client hangs up (or the server cancels
        # the request's task): once forwarded, its outcome and request id must be recorded.
        return await self._uncancellable(self._reserve_forward_settle(admitted))

    async def _uncancellable(self, work: Coroutine[Any, Any, Reply]) -> Reply:
        """Run `work` in a task of its own and wait for it: cancelling the waiter leaves the work
        running (as `asyncio.shield`, but the task hands its outcome to the waiter itself, so the
        reply does not wait for a done-callback); `drain` waits for it."""
        done: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(self._report(work, done))
        self._admitted.add(task)

        def finished(task: asyncio.Task[None]) -> None:
            self._admitted.discard(task)
            if not done.done():  # cancelled before its first step, so `_report` never ran
                work.close()  # nor `work`: nothing was reserved
                done.cancel()

        task.add_done_callback(finished)
        return await done

    async def _report(self, work: Coroutine[Any, Any, Reply], done: asyncio.Future[Reply]) -> None:
        try:
            reply = await work
        except asyncio.CancelledError:
            if not done.done():
                done.cancel()
            raise
        except Exception as error:
            if done.done():  # its request is gone: nobody else will see this
                if not isinstance(error, _PolicyChanged):  # (nothing was forwarded)
                    log.error("an admitted call failed after its client left", exc_info=error)
            else:
                done.set_exception(error)  # the waiter raises it
        else:
            if not done.done():
                done.set_result(reply)

    async def drain(self) -> None:
        """Wait for every admitted call to be settled (at shutdown)."""
        while self._admitted:
            await asyncio.gather(*self._admitted, return_exceptions=True)

    # -- before the reservation: refusals forward nothing -----------------------------------------

    def _read(self, incoming: Incoming) -> VendorCall:
        path = safe_path(incoming.path)
        if path is None:
            raise _Refused(Decision.BAD_PATH)
        return VendorCall(incoming.method, path, incoming.query, incoming.headers, incoming.body)

    async def _authenticate(
        self, vendor: Vendor, call: VendorCall, audit: AuditRecord, *, fresh: bool = False
    ) -> KeyRecord:
        presented = vendor.presented_key(call.headers)
        if not presented:
            raise _Refused(Decision.NO_KEY)
        vault_key, audit.caller_tag = split_presented_key(presented)
        if audit.caller_tag is not None and redact(audit.caller_tag) != audit.caller_tag:
            audit.caller_tag = redact(audit.caller_tag)
            raise _Refused(Decision.SECRET_IN_REQUEST, where="caller tag")
        # Looked up by its SHA-256: the stored hash is never compared with what a caller sent.
        key = await self._keys.find(hash_vault_key(vault_key), fresh=fresh)
        if key is None:
            raise _Refused(Decision.UNKNOWN_KEY)
        audit.key_id, audit.label, audit.budget_id = key.key_id, key.label, key.budget_id
        if key.vendor != vendor.name:
            raise _Refused(Decision.WRONG_VENDOR)
        # Expiry and revocation are the reservation's to read: a key's life can change.
        return key

    def _check_body(self, incoming: Incoming) -> None:
        if incoming.body_timeout is not None:
            raise _Refused(Decision.BODY_TIMEOUT, seconds=f"{incoming.body_timeout:g}")
        if incoming.too_large:
            raise _Refused(Decision.TOO_LARGE)

    def _scope(self, vendor: Vendor, key: KeyRecord, call: VendorCall) -> None:
        if not allows(compile_patterns(key.allowed_endpoints), call.method, call.path):
            raise _Refused(Decision.ENDPOINT_DENIED, ep=f"{call.method} {call.path}")
        if "*" in key.allowed_accounts:
            return
        for account in vendor.accounts(call.headers):
            if account not in key.allowed_accounts:
                allowed = ", ".join(key.allowed_accounts) or "its own account only"
                raise _Refused(Decision.ACCOUNT_DENIED, account=account[:64], allowed=allowed)

    async def _attribute(self, vendor: Vendor, incoming: Incoming, audit: AuditRecord) -> None:
        """Name the key in the audit row of a call refused before it was authenticated (a bad
        path, a secret in it), when the key it presents is valid: the row belongs to its run."""
        presented = vendor.presented_key(incoming.headers)
        if not presented:
            return
        vault_key, tag = split_presented_key(presented)
        key = await self._keys.find(hash_vault_key(vault_key))
        if key is not None and key.vendor == vendor.name:
            audit.key_id, audit.label, audit.budget_id = key.key_id, key.label, key.budget_id
            if audit.caller_tag is None and tag is not None and redact(tag) == tag:
                audit.caller_tag = tag

    async def _estimate(self, vendor: Vendor, call: VendorCall, lookup: _Lookup) -> Cost:
        try:  # a try costs nothing on the way through (a context manager would, every call)
            return await vendor.estimate(call, lookup)
        except EstimateError as exc:
            raise _unreadable(exc) from exc

    async def _constrain(
        self, vendor: Vendor, call: VendorCall, key: KeyRecord, cost: Cost, lookup: _Lookup
    ) -> str | None:
        """Refuse a call outside the key's or its budget's constraints, or whose constrained
        fields cannot be read exactly (`keybrake.proxy.constraints`); under report-only ones,
        say what they would have refused it for (its audit row's note). Only a constrained
        key's calls come here, and they read only the fields constrained for their vendor."""
        layers = [("vault key's", key.constraints), ("budget's", key.budget_constraints)]
        enforced = [(whose, c) for whose, c in layers if c is not None and c.mode != "report"]
        reported = [c for _, c in layers if c is not None and c.mode == "report"]
        strict = frozenset().union(*(c.for_vendor(vendor.name) for _, c in enforced))
        loose = frozenset().union(*(c.for_vendor(vendor.name) for c in reported)) - strict
        found: Found = {}
        if strict:
            try:
                found = await vendor.subjects(call, cost, lookup, strict)
            except EstimateError as exc:
                raise _unreadable(exc) from exc
            for whose, constraints in enforced:
                violation = constraints.check(vendor.name, found)
                if violation is not None:
                    raise _Refused(
                        Decision.CONSTRAINT_VIOLATED, whose=whose, reason=violation.reason
                    )
        if not reported:
            return None
        if loose:
            # Report mode changes no outcome: it reads only what the call's price and its
            # enforced constraints looked up already, never the vendor again (a lookup would
            # reach the vendor and take a place in an enforced call rate); a field that needs
            # one is noted as not checked.
            try:
                found = {**found, **await vendor.subjects(call, cost, _Looked(lookup), loose)}
            except EstimateError as exc:
                unreadable = _unreadable(exc)
                return redact(f"{unreadable.decision}: {unreadable.details['reason']}")
        # A would-be refusal first, in any layer; only then a field left unchecked.
        checked = {n: v.values if isinstance(v, Unchecked) else v for n, v in found.items()}
        for constraints in reported:
            violation = constraints.check(vendor.name, checked)
            if violation is not None:
                # Redacted as a refusal's message is: the reason quotes what the caller sent.
                return redact(f"{Decision.CONSTRAINT_VIOLATED}: {violation.reason}")
        for constraints in reported:
            violation = constraints.check(vendor.name, found)
            if violation is not None:
                return f"{_UNCHECKED}: {violation.reason}"
        return None

    # -- reserve → forward → settle, in a task of its own --------------------------------------

    async def _reserve_forward_settle(self, c: _Call) -> Reply:
        reply = await self._admitted_reply(c)
        self.metrics.count_call(c.vendor.name, c.audit.decision)
        return reply

    async def _admitted_reply(self, c: _Call) -> Reply:
        try:
            admission = await self._reserve(c)
        except StoreUnavailable as exc:
            # Fail closed: without the database nothing is reserved, so nothing is forwarded.
            self._log_newer_schema(exc)
            c.audit.decision = Decision.STORE_UNAVAILABLE
            return self._refusal(c.vendor, Decision.STORE_UNAVAILABLE)
        if admission.decision is Decision.POLICY_CHANGED:
            raise _PolicyChanged()  # nothing reserved, nothing recorded: `_handle` judges again
        c.audit.decision = admission.decision
        if admission.replay is not None:
            return _replayed(admission.replay, admission.decision)
        if admission.decision is not Decision.FORWARDED:
            prior = str(admission.prior_audit_id or "")
            wait = str(admission.retry_after or "")
            return self._refusal(c.vendor, admission.decision, audit_id=prior, retry_after=wait)
        try:
            response = await self._forward(c, admission.forward_key)
        except UpstreamError as exc:
            return await self._settle_unanswered(c, admission, f"{exc}.")  # the final decision
        except Exception:
            # A bug on the way out, after the reservation: the call may have reached the
            # vendor, so it is settled as unanswered (counted as spent, its one audit row kept)
            # rather than left in flight beside a second row saying it was never forwarded.
            log.exception("forwarding audit row %s failed", admission.audit_id)
            return await self._settle_unanswered(c, admission, "the call to the vendor failed.")
        return await self._settle(c, admission, response)  # sets the final decision

    async def _reserve(self, c: _Call) -> Admission:
        vendor, call, key, cost = c.vendor, c.call, c.key, c.cost
        idempotency_key = c.audit.idempotency_key = c.idempotency_key
        # Dedupe is for pod retries, whose SDK makes a fresh idempotency key per process: a call
        # with a key of the caller's own choosing is never merged with another one.
        candidate = idempotency_key is None or vendor.is_sdk_generated(idempotency_key)
        dedupe = cost.priced and key.dedupe_window_s > 0 and candidate
        forward_key = None if idempotency_key is None else _vendor_key(key, idempotency_key)
        if forward_key is None and dedupe and vendor.replays:
            # So that a retry whose first attempt was cut off can be sent with the same key,
            # and the vendor replays its own answer instead of executing twice.
            forward_key = f"keybrake-{uuid.uuid4().hex}"
        # Only a call holding a replay token (its idempotency key, its dedupe fingerprint) is
        # ever matched against another: the fingerprint is not computed for the others.
        request_hash = _fingerprint(vendor, call) if idempotency_key or dedupe else ""
        c.reservation = Reservation(
            key=key,
            now=c.audit.ts,
            vendor=vendor.name,
            method=call.method,
            path=call.path,
            caller_tag=c.audit.caller_tag,
            cost_micros=cost.micros,
            amount=cost.amount,
            currency=cost.currency,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            dedupe=dedupe,
            forward_key=forward_key,
            vendor_replays=vendor.replays,
            caller=caller_of(c.audit.caller_tag),
            paid_object=cost.paid_object,
            report=c.report,
            # Counted against call rates when it goes out, after its lookups, as they are.
            second=second_of(self.clock()) if _rated(key) else None,
        )
        timed = perf_counter()
        admission = await self.store.reserve(c.reservation)
        self.metrics.time_database("reserve", perf_counter() - timed)
        if admission.decision is Decision.POLICY_CHANGED:
            return admission  # nothing recorded: judged again
        # Counted as the audit row notes them: each would-be refusal once, when recorded.
        c.audit.reported = admission.reported
        if c.report is not None and not c.report.startswith(_UNCHECKED):
            self.metrics.count_report(vendor.name, c.report.partition(":")[0])
        if admission.reported is not None and admission.reported != c.report:
            self.metrics.count_report(vendor.name, Decision.RATE_LIMITED)
        if admission.reserved_micros != cost.micros and admission.decision is Decision.FORWARDED:
            # Offset by what its payer already paid for the object: it costs the rest.
            c.cost = cost.with_micros(admission.reserved_micros)
        return admission

    async def _forward(self, c: _Call, forward_key: str | None) -> UpstreamResponse:
        """The vendor's answer; `UpstreamError` when there is no usable one."""
        vendor, call = c.vendor, c.call
        target, auth = vendor.upstream_request(call)
        # Header names with `_` are dropped: some servers read `Stripe_Account` as
        # `Stripe-Account`, which the scope check would not have seen.
        headers = [
            (k, v)
            for k, v in call.headers.items()
            if k not in HOP_BY_HOP and "_" not in k and k != vendor.idempotency_header
        ]
        if forward_key is not None and vendor.idempotency_header is not None:
            headers.append((vendor.idempotency_header, forward_key))
        headers.extend(auth.items())
        timed = perf_counter()
        response = await self.upstream.send(
            call.method, vendor.credentials.base_url + target, headers, call.body
        )
        self.metrics.time_upstream(vendor.name, perf_counter() - timed)
        return response

    async def _settle(self, c: _Call, admission: Admission, response: UpstreamResponse) -> Reply:
        """Settle the call at what the vendor's answer says it cost, and show the answer."""
        vendor, call, audit = c.vendor, c.call, c.audit
        request_id = None
        try:
            answered = _lower(response.headers)
            request_id = vendor.request_id(answered)
            shown_headers, shown_body = vendor.workload_reply(
                call, response.status, response.headers, response.body
            )
            reply = Reply(response.status, shown_headers, shown_body)
            actual = vendor.settle(call, c.cost, response.status, response.body)
            audit.decision = Decision.FORWARDED
            if vendor.is_replay(answered):
                # The vendor answered from its idempotency store: nothing moved this time.
                audit.decision = Decision.VENDOR_REPLAYED
                actual = actual.with_micros(0)
            elif response.status == 409 and vendor.replays:
                # The vendor is still running a request with this idempotency key: this one
                # moved nothing, and what the first will do is not known yet.
                audit.decision = Decision.VENDOR_BUSY
            await self._record_settlement(c, admission, reply, actual, response.status, request_id)
            return reply
        except Exception as exc:
            return self._settle_failed(c, admission, exc, request_id)

    async def _settle_unanswered(self, c: _Call, admission: Admission, reason: str) -> Reply:
        """Settle a call the vendor gave no usable answer to: it may have gone through, so it
        counts as spent (the vendor's `settle` for no status) and its outcome stays unknown."""
        try:
            c.audit.decision = Decision.UPSTREAM_ERROR
            reply = self._refusal(c.vendor, Decision.UPSTREAM_ERROR, reason=reason)
            actual = c.vendor.settle(c.call, c.cost, None, b"")
            await self._record_settlement(c, admission, reply, actual, None, None)
            return reply
        except Exception as exc:
            return self._settle_failed(c, admission, exc, None)

    async def _record_settlement(
        self,
        c: _Call,
        admission: Admission,
        reply: Reply,
        actual: Cost,
        status: int | None,  # the vendor's; None: no answer
        request_id: str | None,
    ) -> None:
        audit = c.audit
        settlement = Settlement(
            audit_id=admission.audit_id,
            key_id=c.key.key_id,
            bucket=bucket_of(c.reservation.now),
            vendor=c.vendor.name,
            reserved_micros=c.cost.micros,
            settled_micros=actual.micros,
            status=reply.status,
            decision=audit.decision,
            vendor_request_id=request_id,
            latency_ms=round((perf_counter() - c.started) * 1000, 3),
            idempotency_key=c.reservation.idempotency_key,
            request_hash=c.reservation.request_hash,
            dedupe=c.reservation.dedupe,
            dedupe_token=c.reservation.dedupe_token if c.reservation.dedupe else "",
            # A 5xx is not kept (a retry is sent again); no answer at all, or the vendor's
            # "still running", leaves the outcome unknown, so a retry goes out with the same
            # idempotency key. A call holding no replay token has nowhere to keep it.
            response=(
                StoredResponse(reply.status, reply.headers, reply.body)
                if status is not None
                and status < 500
                and audit.decision in _KEPT
                and (c.reservation.idempotency_key or c.reservation.dedupe)
                else None
            ),
            outcome_known=status is not None and audit.decision is not Decision.VENDOR_BUSY,
            counts=actual.counts if status is not None and status < 300 else (),
            budget_id=c.key.budget_id,
            caller=(c.reservation.caller if c.key.max_per_caller_micros is not None else None),
        )
        timed = perf_counter()
        await self.store.settle(settlement)
        self.metrics.time_database("settle", perf_counter() - timed)

    def _settle_failed(
        self, c: _Call, admission: Admission, exc: Exception, request_id: str | None
    ) -> Reply:
        # Forwarded, but not recorded: the reservation stays counted and the sweep reconciles
        # it. Saying "not forwarded" here would invite a retry that charges twice.
        if not isinstance(exc, StoreUnavailable):
            log.error("settling audit row %s failed", admission.audit_id, exc_info=exc)
        c.audit.decision = Decision.SETTLE_FAILED
        shown = f" (its request id: {request_id})" if request_id else ""
        return self._refusal(c.vendor, Decision.SETTLE_FAILED, request_id=shown)

    # -- replies -----------------------------------------------------------------------------

    async def _unknown_vendor(self, incoming: Incoming, audit: AuditRecord) -> Reply:
        status, code, message = refusal(Decision.UNKNOWN_VENDOR)
        audit.status, audit.decision = status, Decision.UNKNOWN_VENDOR
        await self.store.record(audit)
        self.metrics.count_call("unknown", Decision.UNKNOWN_VENDOR)
        text = redact(message.format(vendor=incoming.vendor[:64]))
        body = json.dumps({"error": {"type": "not_found", "code": code, "message": text}})
        return Reply(status, [("content-type", "application/json")], body.encode())

    def _refusal(self, vendor: Vendor | None, decision: Decision, **details: str) -> Reply:
        status, code, message = refusal(decision)
        text = redact(message.format(**details) if details else message)
        if vendor is None:
            body = json.dumps({"error": {"type": "api_error", "code": code, "message": text}})
            return Reply(status, [("content-type", "application/json")], body.encode())
        payload, headers = vendor.error(status, code, text)
        # keybrake's code in a header too: an SDK whose exception keeps the headers but not the
        # body (Resend's) still tells a pod keybrake's refusal from the vendor's.
        out = [("content-type", "application/json"), *headers.items(), (CODE_HEADER, code)]
        if is_cap_hit(decision):
            out.append((CAP_HIT_HEADER, "true"))
        elif decision is Decision.RATE_LIMITED:  # a wait, never a cap: the pod retries later
            out += [(RATE_LIMITED_HEADER, "true"), ("retry-after", details["retry_after"])]
        elif decision is Decision.POLICY_CHANGED:  # nothing forwarded: the same call may go again
            out.append(("retry-after", "1"))
        if decision is Decision.BODY_TIMEOUT:
            out.append(("connection", "close"))
        return Reply(status, out, payload)


def _rated(key: KeyRecord) -> bool:
    """Whether the key or its budget has a call rate, as its cached record says (a patch of it
    makes the reservation judge the call again: rule 0)."""
    layers = (key.constraints, key.budget_constraints)
    return any(c is not None and c.max_calls_per_minute is not None for c in layers)


def _idempotency_key(vendor: Vendor, headers: Mapping[str, str]) -> str | None:
    if vendor.idempotency_header is None:
        return None
    value = headers.get(vendor.idempotency_header)
    return value[:255] if value else None


def _fingerprint(vendor: Vendor, call: VendorCall) -> str:
    """What makes two requests the same request: method, path, query, body, and the headers
    choosing the vendor account (the same body on another account is another call)."""
    digest = hashlib.sha256()
    parts = [call.method.encode(), call.path.encode(), call.query.encode(), call.body]
    for name in vendor.account_headers:
        if name in call.headers:
            parts += (name.encode(), call.headers[name].encode())
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _vendor_key(key: KeyRecord, chosen: str) -> str:
    """The idempotency key a caller's own goes out to the vendor as. keybrake's replays are per
    vault key, but the vendor keeps one store per account, shared by every run on it: forwarded
    as sent, another team's run sending the same key (one derived from a work item, say) would
    get this run's answer back (its object, an intent's client secret), or spoil the key with
    another body. So it is scoped to whom the key was issued by and for, its issuer and
    namespace: a resubmitted run of the same scope, with new vault keys, still has the vendor
    replay what the first run did, which is what a key derived from the work item is for."""
    owner = key.owner or Owner()
    digest = hashlib.sha256()
    for part in (owner.issuer_id or "", owner.namespace or "", chosen):
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return f"keybrake-{digest.hexdigest()}"


def _lower(headers: list[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers}


def _replayed(stored: StoredResponse, decision: str) -> Reply:
    headers = [*stored.headers, ("X-Keybrake-Replayed", decision)]
    return Reply(stored.status, headers, stored.body)
