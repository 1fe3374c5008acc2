"""The money model of docs/guarantees.md as plain Python: what the proxy must decide for each
call, and what it must count. Written from the document, importing nothing from the proxy's
decision or store code; `test_money_model.py` drives the real proxy and this model with the
same random sequences and holds them to the same answers.

Units: micro-dollars (integers). Time: UTC datetimes; the rolling window is kept in hourly
buckets (guarantees, section 3): a check at t counts every bucket from the one holding t - 24h.

Constraints (guarantees, section 6) are restated for the fields the model draws: Stripe's
`customers` and `currencies`, Twilio's `recipients`, Resend's `recipient_domains`; and call rates
(`max_calls_per_minute`, "How fast: call rates"), in `enforce` or `report` mode ("Report-only").
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CENT = 10_000  # micro-dollars in a US cent
SEGMENT = 8_300  # Twilio, per SMS segment to +1 ($0.0083)
MMS = 22_000  # Twilio, per MMS ($0.0220)
# What keybrake counts for the link MMS Converter adds to a media message it sends as an SMS to a
# carrier without MMS: a newline and 35 characters (proxy/vendors/twilio.py states it; the
# model's Twilio writes a shorter one, as Twilio's are).
CONVERTER_LINK_COUNTED = 1 + 35
EMAIL = 900  # Resend, per recipient ($0.0009)
RESERVATION_TTL = timedelta(minutes=5)
REPLAY_RETENTION = timedelta(hours=24)

# The decisions the proxy records (its audit row's `decision`).
FORWARDED = "forwarded"
DEAD = ("revoked", "expired", "budget_revoked", "budget_expired")
CONSTRAINT_VIOLATED = "constraint_violated"
UNPRICEABLE = "unpriceable"
RATE_LIMITED = "rate_limited"
# Section 6, "How fast": a rate counts the calls that reached a vendor in the current second and
# the 60 before it (so no 60 seconds ever hold more than the limit).
RATE_SECONDS = 60
RATE_NOTE = "rate_limited: over max_calls_per_minute"

# Section 6: the constrained fields a call to each vendor is checked against (of those the model
# draws). A budget may hold any vendor's; a call is held to its own vendor's only.
CONSTRAINT_FIELDS = {
    "stripe": ("currencies", "customers"),
    "twilio": ("recipients",),
    "resend": ("recipient_domains",),
}
Constraints = dict[str, tuple[str, ...]]  # field -> values, as issued (patterns included)


def admits(field: str, allowed: tuple[str, ...], named: str | None) -> bool:
    """Whether constraint values `allowed` of `field` admit one value a call names, as the call
    names it (None: it names none, or the object it acts on holds none). Stripe's ids are exact
    and currencies any case; a phone number, with an optional `whatsapp:` channel, is `+` and
    digits, matched exactly or by a prefix pattern (`+4420*`); an address's domain is compared
    lower-cased and IDNA-encoded, exactly (no subdomains). A value that cannot be read so is
    admitted by nothing."""
    if named is None:
        return False
    if field == "customers":
        return named in allowed
    if field == "currencies":
        return named.lower() in {value.lower() for value in allowed}
    if field == "recipients":
        number = _phone_number(named)
        return number is not None and any(
            number.startswith(pattern[:-1]) if pattern.endswith("*") else number == pattern
            for pattern in allowed
        )
    if field == "recipient_domains":
        domain = _domain_of(named)
        return domain is not None and domain in {_idna(value) for value in allowed}
    raise AssertionError(f"the model draws no {field} constraint")


_E164 = re.compile(r"(?:whatsapp:)?(\+[1-9][0-9]{1,14})")
# An address's local part: RFC 5322's dot-atom (no quoting).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"


def priceable(call: Call) -> bool:
    """Section 1: a Twilio message is priced by its destination, its `To` read as a phone
    number is (`+` and digits, an optional `whatsapp:` channel); any other `To`, and a message
    scheduled for later (`SendAt`), is refused before anything else is judged. (The model draws
    no other unpriceable call.)"""
    if call.vendor != "twilio":
        return True
    fields = parse_qsl(call.body.decode())
    if any(name == "SendAt" for name, _ in fields):
        return False  # a scheduled message: sent and billed later, after the key may be revoked
    to = [value for name, value in fields if name == "To"]
    return len(to) == 1 and _phone_number(to[0]) is not None


def _phone_number(named: str) -> str | None:
    found = _E164.fullmatch(named)
    return found.group(1) if found else None


def _domain_of(address: str) -> str | None:
    """The domain of one address, `local@domain` or `Name <local@domain>`."""
    text = address.strip()
    angled = re.fullmatch(r"[^<>@,;\"]*<([^<>]*)>", text)
    if angled is not None:
        text = angled.group(1).strip()
    local, at, domain = text.rpartition("@")
    if not at or not re.fullmatch(rf"{_ATOM}(?:\.{_ATOM})*", local):
        return None
    return _idna(domain)


def _idna(domain: str) -> str | None:
    try:
        encoded = domain.strip().lower().encode("idna").decode("ascii")
    except UnicodeError:
        return None
    labels = encoded.split(".")
    label = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
    if len(labels) < 2 or not all(label.fullmatch(part) for part in labels):
        return None
    return encoded


def bucket(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(hours=1)


def floor_of(now: datetime) -> int:
    return bucket(now - timedelta(hours=24))


def seconds(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(seconds=1)


@dataclass
class Key:
    id: str
    vendor: str
    daily: int | None
    total: int | None
    per_call: int | None
    per_caller: int | None
    dedupe: timedelta
    expires: datetime
    budget: str | None
    revoked: bool = False
    issuer: str | None = None  # None: the admin issued it
    accounts: tuple[str, ...] = ()  # connected accounts it may act on (Stripe-Account)
    constraints: Constraints | None = None
    rate: int | None = None  # max_calls_per_minute
    report: bool = False  # its constraints (rate included) are report-only


@dataclass
class Budget:
    id: str
    daily: int | None
    total: int | None
    expires: datetime
    revoked: bool = False
    issuer: str | None = None
    constraints: Constraints | None = None
    rate: int | None = None
    report: bool = False


@dataclass
class Policy:
    """What an issuer may issue (guarantees, section 2): what actually bounds a key or budget
    in any 24 hours and over its life must lie within these maxima."""

    max_daily: int | None
    max_total: int | None
    # Whom what it issues may pay or message (enforced; section 6): a key or budget issued
    # without its own inherits them; a loosening patch must leave it within them.
    constraints: Constraints | None = None

    def bound(self, vendor: str | None) -> Constraints | None:
        """The issuer's constraints that bind a key of `vendor` (a budget, None: all)."""
        if self.constraints is None:
            return None
        kept = {
            name: values
            for name, values in self.constraints.items()
            if vendor is None or name in CONSTRAINT_FIELDS[vendor]
        }
        return kept or None

    def allows(self, daily: int | None, total: int | None, budget: Budget | None) -> bool:
        """A key (`budget`: the one it draws on) or, with budget None, a budget's own caps."""
        for cap, most in ((daily, self.max_daily), (total, self.max_total)):
            if cap is not None and most is not None and cap > most:
                return False  # an explicit cap above the maximum
        caps = [daily, total]
        lives = [total]
        if budget is not None:
            caps += [budget.daily, budget.total]
            lives += [budget.total]
        in_24h = min((c for c in caps if c is not None), default=None)
        in_life = min((c for c in lives if c is not None), default=None)
        if self.max_daily is not None and (in_24h is None or in_24h > self.max_daily):
            return False
        return not (self.max_total is not None and (in_life is None or in_life > self.max_total))

    def allows_patch(
        self,
        before: tuple[int | None, int | None],
        after: tuple[int | None, int | None],
        budget: Budget | None,
        constraints: Constraints | None = None,
        vendor: str | None = None,
    ) -> bool:
        """Tightening is always allowed; loosening must leave the whole record within policy,
        its `constraints` (as patched) within the issuer's too."""
        loosens = any(
            old is not None and (new is None or new > old)
            for old, new in zip(before, after, strict=True)
        )
        return not loosens or (
            self.allows(*after, budget) and within(constraints, self.bound(vendor))
        )


def within(own: Constraints | None, bound: Constraints | None) -> bool:
    """Whether `own` constrains every field `bound` does, at least as narrowly: each of its
    values one `bound` covers (a number prefix within a shorter one)."""
    if bound is None:
        return True
    return own is not None and all(
        name in own and all(_covers(name, allowed, value) for value in own[name])
        for name, allowed in bound.items()
    )


def _covers(name: str, allowed: tuple[str, ...], value: str) -> bool:
    if name == "recipients" and value.endswith("*"):
        return any(a.endswith("*") and value[:-1].startswith(a[:-1]) for a in allowed)
    if name == "recipient_domains":
        return _idna(value) in {_idna(a) for a in allowed}
    return admits(name, allowed, value)


@dataclass
class Call:
    """One call as a pod sends it."""

    key: str
    vendor: str
    method: str
    path: str
    body: bytes
    tag: str | None = None
    idempotency_key: str | None = None
    sdk_key: bool = False  # the idempotency key is one an official SDK made up (a UUID)
    gross: int = 0  # what it moves or bills, as the vendor reads it
    paid_object: str | None = None  # a confirm or capture: the object whose money it moves
    replays: bool = True  # the vendor replays answers for a repeated idempotency key
    looks_up: bool = False  # pricing it reads the object at the vendor first
    account: str | None = None  # the connected account it acts on (guarantees, section 4)
    priced: bool = True  # it may move money (an update naming no new amount does not)
    # Whom it pays or messages, by constrained field, as it names them (section 6): None where it
    # names none or the object it acts on holds none. A field missing: the call has none (a free
    # call's currency).
    subjects: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    # The object whose customer a customers constraint reads, looked up (an update or action on
    # an intent, a refund): read only for a live key, as pricing's lookups are.
    acts_on: str | None = None

    @property
    def fingerprint(self) -> tuple[str, str, bytes, str | None]:
        return (self.method, self.path, self.body, self.account)

    @property
    def item(self) -> str | None:
        return None if self.tag is None or "@" not in self.tag else self.tag.partition("@")[0]

    @property
    def caller(self) -> str:
        return (self.tag or "").partition("@")[0]


@dataclass
class Prior:
    """An earlier call holding an idempotency key or a dedupe token."""

    fingerprint: tuple[str, str, bytes, str | None]
    created: datetime
    call_id: int
    state: str  # "answered", "in_flight", "cut_off"
    forward_key: str | None
    answer: object = None  # what it answered (replayed)


@dataclass
class Admission:
    decision: str
    cost: int = 0
    prior: Prior | None = None
    forward_key: str | None = None  # a retry of a cut-off call goes out with its first key
    retry_after: int | None = None  # rate_limited: seconds until the call fits
    lookups: int = 0  # lookups that reached the vendor (and were counted) for it
    # What report-only policies would have refused it for: "constraint", "rate", in that order.
    reported: tuple[str, ...] = ()


@dataclass
class Mark:
    key: str
    budget: str | None
    micros: int


@dataclass
class Model:
    keys: dict[str, Key] = field(default_factory=dict)
    budgets: dict[str, Budget] = field(default_factory=dict)
    # owner (key or budget id) -> bucket -> micros counted (settled or reserved)
    spend: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    caller_spend: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    # (vendor, object) -> bucket -> payer key -> mark
    marks: dict[tuple[str, str], dict[int, dict[str, Mark]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict))
    )
    by_idempotency: dict[tuple[str, str], Prior] = field(default_factory=dict)
    by_dedupe: dict[tuple[str, tuple[tuple[str, str, bytes, str | None], str | None]], Prior] = (
        field(default_factory=dict)
    )
    in_flight: dict[int, tuple[datetime, Call, int]] = field(default_factory=dict)
    # owner (key or budget id) -> the seconds (since the epoch) of each call of its that reached
    # a vendor: forwarded calls and the proxy's lookups with the real key.
    reached: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    # -- reading ---------------------------------------------------------------------------------

    def window(self, owner: str, now: datetime) -> int:
        low = floor_of(now)
        return sum(m for b, m in self.spend[owner].items() if b >= low)

    def life(self, owner: str) -> int:
        return sum(self.spend[owner].values())

    def dead(self, key: Key, now: datetime) -> str | None:
        """Rule 1 (guarantees, section 5)."""
        if key.revoked:
            return "revoked"
        if key.expires <= now:
            return "expired"
        if key.budget is not None:
            budget = self.budgets[key.budget]
            if budget.revoked:
                return "budget_revoked"
            if budget.expires <= now:
                return "budget_expired"
        return None

    def paid_for(self, call: Call, key: Key, now: datetime) -> list[tuple[int, Mark]]:
        """What this call's payer (the key, or a key on its budget) paid for its object within
        the window (guarantees, section 3)."""
        if call.paid_object is None:
            return []
        low = floor_of(now)
        found = []
        for at, payers in self.marks[(call.vendor, call.paid_object)].items():
            for mark in payers.values():
                ours = mark.key == key.id or (mark.budget is not None and mark.budget == key.budget)
                if at >= low and ours:
                    found.append((at, mark))
        return found

    # -- deciding --------------------------------------------------------------------------------

    def layers(self, key: Key, *, enforced: bool = True) -> list[Constraints]:
        """The constraints a key's calls are held to: its own, and its budget's (`enforced`:
        only those that refuse; else the report-only ones)."""
        owners: list[Key | Budget] = [key] + ([self.budgets[key.budget]] if key.budget else [])
        found = [o.constraints for o in owners if o.report != enforced]
        return [c for c in found if c is not None]

    def outside(self, call: Call, key: Key) -> bool:
        """Section 6: a value the call names, of a field its vendor's calls are checked against,
        that the key's or its budget's enforced constraints do not admit."""
        return any(self._finding(call, key, c) for c in self.layers(key))

    def report(self, call: Call, key: Key) -> str | None:
        """What the report-only constraints note (section 6): "constraint" when any report-only
        layer does not admit a value the call names; else "unchecked" when one constrains a
        customer only a lookup of its own could read (report mode makes none)."""
        found = {self._finding(call, key, c) for c in self.layers(key, enforced=False)}
        for finding in ("constraint", "unchecked"):
            if finding in found:
                return finding
        return None

    def _finding(self, call: Call, key: Key, constraints: Constraints) -> str | None:
        looked_up = self.looks_up(call, key)
        unchecked = None
        for name, allowed in sorted(constraints.items()):
            if name not in CONSTRAINT_FIELDS[call.vendor]:
                continue  # (a budget's constraint on another vendor's calls)
            values = call.subjects.get(name, ())
            if name == "customers" and call.acts_on is not None and not looked_up:
                # (Only a report-only layer gets here: enforced ones look.) The object's customer
                # goes unchecked; an update's new one, read from its body, is checked.
                unchecked, values = "unchecked", values[1:]
            if not all(admits(name, allowed, v) for v in values):
                return "constraint"
        return unchecked

    def looks_up(self, call: Call, key: Key) -> bool:
        """Whether the proxy reads the call's object at the vendor before admitting it: to price
        it, or for the customer an enforced customers constraint is checked against (a
        report-only one reads what was looked up anyway, and makes no lookup of its own)."""
        constrained = {name for c in self.layers(key) for name in c}
        return call.looks_up or (call.acts_on is not None and "customers" in constrained)

    def lookups(self, call: Call, key: Key) -> int:
        """How many lookups the proxy makes for the call: one object, read once for its price
        and its constraints alike (docs/guarantees.md section 6)."""
        return 1 if self.looks_up(call, key) else 0

    # -- call rates (section 6, "How fast") -------------------------------------------------------

    def rated(self, key: Key) -> list[Key | Budget]:
        """The key and its budget, those with a call rate, the key first."""
        owners: list[Key | Budget] = [key] + ([self.budgets[key.budget]] if key.budget else [])
        return [o for o in owners if o.rate is not None]

    def in_rate_window(self, owner: str, second: int, extra: int = 0) -> list[int]:
        """The seconds of the owner's calls at a vendor that its rate counts at `second` (and
        `extra` more, made now)."""
        return sorted(
            [s for s in self.reached[owner] if s >= second - RATE_SECONDS] + [second] * extra
        )

    def rate_check(
        self, key: Key, now: datetime, *, extra: int = 0, reports: bool = True, places: int = 1
    ) -> tuple[int | None, bool]:
        """`places` more calls at a vendor for `key` now (after `extra` uncommitted ones; a
        lookup asks for two, itself and its call): (seconds until they fit, when an enforced
        rate is full, else None; whether a report-only rate is full). They fit when count +
        places <= limit; later, once the oldest calls that must leave the window have left it
        (each leaves RATE_SECONDS + 1 seconds after it); never when places > limit."""
        second = seconds(now)
        wait: int | None = None
        noted = False
        for owner in self.rated(key):
            if owner.report and not reports:
                continue
            counted = self.in_rate_window(owner.id, second, extra)
            assert owner.rate is not None
            must_leave = len(counted) + places - owner.rate
            if must_leave <= 0:
                continue
            if owner.report:
                noted = True
                continue
            # The oldest `must_leave` calls must leave: the last of them decides.
            if must_leave > len(counted):
                fits = RATE_SECONDS + 1  # more places than the limit: they never fit
            else:
                fits = max(1, counted[must_leave - 1] + RATE_SECONDS + 1 - second)
            wait = fits if wait is None else max(wait, fits)
        return wait, noted

    def count_call(self, key: Key, now: datetime) -> None:
        """A call at a vendor counts for each owner with a call rate, enforced or report-only,
        now (a rate set by a patch counts the calls from then on)."""
        for owner in self.rated(key):
            self.reached[owner.id].append(seconds(now))

    def decide(
        self, call: Call, now: datetime, *, reports: bool = True, commit: bool = True
    ) -> Admission:
        """The proxy's decision for `call` now. `reports=False`: as if the key's and its budget's
        report-only constraints (their rates included) were not there. `commit`: count the
        lookups it makes (they reach the vendor whatever is decided after)."""
        key = self.keys[call.key]
        if call.account is not None and call.account not in key.accounts:
            return Admission("account_denied")  # the key's scope, read before its life
        if not priceable(call):
            return Admission(UNPRICEABLE)  # priced before anything else is judged
        dead = self.dead(key, now)
        lookups = 0
        reported: list[str] = []
        # A dead key reaches no vendor (section 5): a lookup reads its life first. A call that
        # looks nothing up is checked against its constraints before its reservation reads it.
        if self.looks_up(call, key):
            if dead is not None:
                return Admission(dead)
        for _ in range(self.lookups(call, key)):
            # Each lookup reaches the vendor: it takes a place in the call rates first (before
            # constraints, replays and caps), or the call is refused for it.
            wait, _ = self.rate_check(
                key, now, extra=0 if commit else lookups, reports=reports, places=2
            )
            if wait is not None:
                return Admission(RATE_LIMITED, retry_after=wait, lookups=lookups)
            lookups += 1
            if commit:
                self.count_call(key, now)
        admitted = self._decide(call, key, now, dead, lookups, commit, reports, reported)
        admitted.lookups = lookups
        admitted.reported = tuple(reported)
        return admitted

    def _decide(
        self,
        call: Call,
        key: Key,
        now: datetime,
        dead: str | None,
        lookups: int,
        commit: bool,
        reports: bool,
        reported: list[str],
    ) -> Admission:
        if self.outside(call, key):
            return Admission(CONSTRAINT_VIOLATED)  # before anything is reserved (section 6)
        noted = self.report(call, key) if reports else None
        if noted is not None:
            reported.append(noted)  # report-only: noted, the call goes on
        if dead is not None:
            return Admission(dead)
        prior = None
        from_idempotency = False
        if call.idempotency_key is not None:
            prior = self.by_idempotency.get((key.id, call.idempotency_key))
            if prior is not None:
                if prior.fingerprint != call.fingerprint:
                    return Admission("idempotency_mismatch")
                from_idempotency = True
        if prior is None and self.dedupe_candidate(call, key):
            found = self.by_dedupe.get((key.id, (call.fingerprint, call.item)))
            if found is not None and found.created >= now - key.dedupe:
                prior = found
        forward_key = None
        if prior is not None:
            if prior.state == "answered":
                return Admission("replayed" if from_idempotency else "deduplicated", prior=prior)
            if prior.state == "in_flight":
                return Admission("in_progress")
            if not call.replays or prior.forward_key is None:
                return Admission("outcome_unknown")
            forward_key = prior.forward_key
        cost = call.gross
        paid = self.paid_for(call, key, now)
        if paid:
            cost = max(0, cost - sum(mark.micros for _, mark in paid))
        if key.per_call is not None and cost > key.per_call:
            return Admission("per_call_cap_hit")
        if cost > 0:
            if (
                key.per_caller is not None
                and self.caller_spend[(key.id, call.caller)] + cost > key.per_caller
            ):
                return Admission("caller_cap_hit")
            if key.daily is not None and self.window(key.id, now) + cost > key.daily:
                return Admission("cap_hit")
            if key.total is not None and self.life(key.id) + cost > key.total:
                return Admission("total_cap_hit")
            if key.budget is not None:
                budget = self.budgets[key.budget]
                over_day = budget.daily is not None and (
                    self.window(budget.id, now) + cost > budget.daily
                )
                over_life = budget.total is not None and self.life(budget.id) + cost > budget.total
                if over_day or over_life:
                    return Admission("budget_cap_hit")
        # Last, the call rates (a cap hit wins over a full rate): what reaches the vendor.
        extra = 0 if commit else lookups
        wait, noted = self.rate_check(key, now, extra=extra, reports=reports)
        if wait is not None:
            return Admission(RATE_LIMITED, retry_after=wait)
        if noted:
            reported.append("rate")
        return Admission(FORWARDED, cost=cost, forward_key=forward_key)

    def dedupe_candidate(self, call: Call, key: Key) -> bool:
        """A pod retry is merged with its first attempt only if it moves money: a free call
        (a new customer, no new amount) is sent again."""
        candidate = call.idempotency_key is None or call.sdk_key
        return call.priced and key.dedupe > timedelta(0) and candidate

    # -- counting --------------------------------------------------------------------------------

    def _add(self, owner: str, at: int, micros: int) -> None:
        self.spend[owner][at] = self.spend[owner].get(at, 0) + micros

    def reserve(self, call: Call, now: datetime, admitted: Admission) -> None:
        """What an admitted call counts at once: its cost on its key, budget and caller, and the
        payer's marks re-dated to now (the money moves now)."""
        key = self.keys[call.key]
        at = bucket(now)
        for was, mark in self.paid_for(call, key, now):
            if was == at:
                continue
            for owner in (mark.budget, mark.key):
                if owner is not None:
                    self._add(owner, was, -mark.micros)
                    self._add(owner, at, mark.micros)
            payers = self.marks[(call.vendor, call.paid_object or "")]
            del payers[was][mark.key]
            self._mark(call.vendor, call.paid_object or "", at, mark.key, mark.budget, mark.micros)
        for owner in (key.budget, key.id):
            if owner is not None:
                self._add(owner, at, admitted.cost)
        self.caller_spend[(key.id, call.caller)] += admitted.cost
        self.count_call(key, now)  # it reaches the vendor: a place in the call rates

    def _mark(
        self, vendor: str, obj: str, at: int, key: str, budget: str | None, micros: int
    ) -> None:
        payers = self.marks[(vendor, obj)][at]
        if key in payers:
            payers[key].micros += micros
        else:
            payers[key] = Mark(key, budget, micros)

    def settle(
        self,
        call: Call,
        reserved_at: datetime,
        cost: int,
        settled: int,
        paid_objects: tuple[str, ...],
    ) -> None:
        """The outcome replaces the reservation; objects a 2xx paid for are marked paid by its
        key and budget, for what it settled."""
        key = self.keys[call.key]
        at = bucket(reserved_at)
        for owner in (key.budget, key.id):
            if owner is not None:
                self._add(owner, at, settled - cost)
        self.caller_spend[(key.id, call.caller)] += settled - cost
        if settled > 0:
            for obj in dict.fromkeys(paid_objects):
                self._mark(call.vendor, obj, at, key.id, key.budget, settled)

    def remember(
        self,
        call: Call,
        now: datetime,
        call_id: int,
        state: str,
        forward_key: str | None,
        answer: object,
    ) -> None:
        """The replay tokens a forwarded call holds, in the state its outcome left them."""
        key = self.keys[call.key]
        prior = Prior(call.fingerprint, now, call_id, state, forward_key, answer)
        if call.idempotency_key is not None:
            self.by_idempotency[(key.id, call.idempotency_key)] = prior
        if self.dedupe_candidate(call, key):
            self.by_dedupe[(key.id, (call.fingerprint, call.item))] = prior

    def forget_call(self, call: Call, call_id: int) -> None:
        """A call whose outcome is known but not kept (a 5xx) frees its tokens."""
        key = self.keys[call.key]
        tokens = []
        if call.idempotency_key is not None:
            tokens.append((self.by_idempotency, (key.id, call.idempotency_key)))
        if self.dedupe_candidate(call, key):
            tokens.append((self.by_dedupe, (key.id, (call.fingerprint, call.item))))
        for table, token in tokens:
            held = table.get(token)  # type: ignore[attr-defined]
            if held is not None and held.call_id == call_id:
                del table[token]  # type: ignore[attr-defined]

    def sweep(self, now: datetime) -> None:
        """Calls left in flight past the reservation TTL count as spent, outcome unknown."""
        for call_id, (at, call, _cost) in list(self.in_flight.items()):
            if at < now - RESERVATION_TTL:
                del self.in_flight[call_id]
                for table in (self.by_idempotency, self.by_dedupe):
                    for prior in table.values():  # type: ignore[attr-defined]
                        if prior.call_id == call_id and prior.state == "in_flight":
                            prior.state = "cut_off"

    def forget_replays(self, now: datetime) -> None:
        for table in (self.by_idempotency, self.by_dedupe):
            for token, prior in list(table.items()):  # type: ignore[attr-defined]
                if prior.created < now - REPLAY_RETENTION:
                    del table[token]  # type: ignore[attr-defined]

    def revoke_budget(self, budget_id: str) -> None:
        """Revoking a budget revokes every key on it."""
        self.budgets[budget_id].revoked = True
        for key in self.keys.values():
            if key.budget == budget_id:
                key.revoked = True
