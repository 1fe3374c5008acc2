"""Threshold alerts: a webhook POST when a live key's or budget's spend goes from below a
threshold of its cap (KEYBRAKE_ALERT_THRESHOLDS, default 50, 80 and 100 %) to at or above it,
and on its first cap hit.

- **Raised once per crossing.** A scan (every KEYBRAKE_ALERT_INTERVAL seconds, and at once after a
  cap hit) compares each live key and budget with the thresholds it has already alerted on
  (`alert_marks`). A new crossing writes its mark and its delivery to the outbox in one
  transaction, so of several replicas scanning together exactly one raises it. A threshold re-arms
  when spend falls back below it (the rolling window moved on, or the cap was raised).
- **Delivered at least once.** Deliveries wait in the outbox (in the database: a restart loses
  none) until the receiver answers 2xx; failures are retried with backoff, each attempt and error
  recorded (`GET /vault/alerts`, `keybrake alerts`, `keybrake_alerts_failing`). Each carries a
  `delivery_id` (also the `X-Keybrake-Delivery` header) for the receiver to drop repeats.
- **Off the request path.** The request path only sets an event on a cap hit; scanning and
  sending run in a background task.
- **Where to:** KEYBRAKE_ALERT_WEBHOOK_URL only, the operator's setting. No API caller can name
  a URL: the proxy holds the vendor secrets and must not POST where a caller says.

The body is Slack-compatible (`text`) and structured: `delivery_id`, `event` (threshold or
cap_hit), `threshold_percent`, `subject` (kind, id, label, namespace, vendor), `cap` (daily or
total), `cap_usd`, `spent_usd`, `at`. With KEYBRAKE_ALERT_WEBHOOK_SECRET it is signed:
`X-Keybrake-Signature: sha256=<hex HMAC-SHA256 of the body>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiohttp

from keybrake.proxy.errors import StoreUnavailable
from keybrake.proxy.money import format_ts, format_usd
from keybrake.proxy.store import Store
from keybrake.proxy.store.records import AlertDelivery, AlertLevel

__all__ = ["CAP_HIT", "Alerts", "Sender", "crossings"]

log = logging.getLogger("keybrake.proxy.alerts")

CAP_HIT = "cap_hit"
BATCH = 10  # deliveries claimed at once
SEND_TIMEOUT = 10.0  # seconds per POST
# A claimed batch's sender has this long (every POST of the batch timing out, and a margin)
# before another replica may send them again.
LEASE = timedelta(seconds=BATCH * SEND_TIMEOUT + 50)
MIN_GAP = 1.0  # seconds between scans at least: a storm of cap hits is one scan a second
MAX_BACKOFF = timedelta(minutes=10)

# (url, body, headers) -> HTTP status; raises OSError or aiohttp.ClientError when unreachable.
Sender = Callable[[str, bytes, dict[str, str]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Crossing:
    level: AlertLevel
    mark: str  # "80%" or "cap_hit"
    percent: int | None
    cap: str  # daily or total
    cap_micros: int
    spent_micros: int


def _fractions(level: AlertLevel) -> list[tuple[str, int, int]]:
    """(cap name, cap, spent against it) for each cap the subject has."""
    caps = []
    if level.daily_cap_micros:
        caps.append(("daily", level.daily_cap_micros, level.window_micros))
    if level.total_cap_micros:
        caps.append(("total", level.total_cap_micros, level.life_micros))
    return caps


def crossings(
    level: AlertLevel, percents: list[int], marked: set[str]
) -> tuple[list[Crossing], list[str]]:
    """What to raise for `level` (thresholds newly reached, of its own or else `percents`, and
    its first cap hit), and which raised thresholds to re-arm (spend is below them again).
    Pure: the rule in one place."""
    caps = _fractions(level)
    raise_: list[Crossing] = []
    rearm: list[str] = []
    # A key or budget issued with its own thresholds alerts at those, not the operator's.
    for percent in percents if level.percents is None else level.percents:
        mark = f"{percent}%"
        # The cap closest to being used up decides (micro-dollars: exact integer arithmetic).
        reached = [(name, cap, spent) for name, cap, spent in caps if spent * 100 >= cap * percent]
        if reached and mark not in marked:
            name, cap, spent = max(reached, key=lambda c: c[2] * 10**6 // c[1])
            raise_.append(Crossing(level, mark, percent, name, cap, spent))
        elif not reached and mark in marked:
            rearm.append(mark)
    # A budget's cap_hits also count its keys' own refusals (their per-call or per-caller caps):
    # only a key's first cap hit is its own to report; a budget's 100 % threshold speaks for it.
    if level.kind == "key" and level.cap_hits and CAP_HIT not in marked and caps:
        name, cap, spent = max(caps, key=lambda c: c[2] * 10**6 // c[1])
        raise_.append(Crossing(level, CAP_HIT, None, name, cap, spent))
    return raise_, rearm


def payload(crossing: Crossing, delivery_id: str, now: datetime) -> str:
    level = crossing.level
    what = f"{level.kind} {level.owner_id} ({level.label}" + (
        f", {level.vendor})" if level.vendor else ")"
    )
    period = "24-hour" if crossing.cap == "daily" else "total"
    cap_text = f"${format_usd(crossing.cap_micros)} {period} cap"
    spent = f"${format_usd(crossing.spent_micros)}"
    if crossing.percent is None:
        text = f"keybrake: {what} hit its cap: a call was refused ({spent} of its {cap_text})"
    else:
        text = f"keybrake: {what} reached {crossing.percent}% of its {cap_text} ({spent} spent)"
    body = {
        "text": text,
        "delivery_id": delivery_id,
        "event": "cap_hit" if crossing.percent is None else "threshold",
        "threshold_percent": crossing.percent,
        "subject": {
            "kind": level.kind,
            "id": level.owner_id,
            "label": level.label,
            "namespace": level.namespace,
            "vendor": level.vendor,
        },
        "cap": crossing.cap,
        "cap_usd": format_usd(crossing.cap_micros),
        "spent_usd": format_usd(crossing.spent_micros),
        "at": format_ts(now),
    }
    return json.dumps(body, separators=(",", ":"))


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Alerts:
    def __init__(
        self,
        store: Store,
        *,
        url: str,
        percents: list[int],
        interval: float,
        clock: Callable[[], datetime],
        secret: bytes | None = None,
        send: Sender | None = None,
    ) -> None:
        self.store = store
        self.url = url
        self.percents = percents
        self.interval = interval
        self.clock = clock
        self.secret = secret
        self._send = send
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._delivered = asyncio.Event()

    def poke(self) -> None:
        """A cap hit: look now, not at the next interval (the request path's only part)."""
        self._wake.set()

    async def scan(self) -> int:
        """Raise what is newly crossed, re-arm what fell back; the number raised."""
        now = self.clock()
        levels = await self.store.alert_levels(now)
        marks = await self.store.alert_marks()
        by_owner: dict[str, set[str]] = {}
        for owner, mark in marks:
            by_owner.setdefault(owner, set()).add(mark)
        raised = 0
        for level in levels:
            new, rearm = crossings(level, self.percents, by_owner.get(level.owner_id, set()))
            if rearm:
                await self.store.rearm_alerts(level.owner_id, rearm)
            for crossing in new:
                delivery_id = "al_" + uuid.uuid4().hex
                delivery = AlertDelivery(
                    delivery_id=delivery_id,
                    owner_id=level.owner_id,
                    mark=crossing.mark,
                    payload=payload(crossing, delivery_id, now),
                    created_at=now,
                )
                if await self.store.raise_alert(delivery):
                    raised += 1
        return raised

    async def deliver(self) -> int:
        """Send what is due; the number delivered."""
        now = self.clock()
        delivered = 0
        for item in await self.store.claim_alerts(now, LEASE, limit=BATCH):
            body = item.payload.encode()
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "keybrake-alerts",
                "X-Keybrake-Delivery": item.delivery_id,
            }
            if self.secret is not None:
                headers["X-Keybrake-Signature"] = signature(self.secret, body)
            error: str | None = None
            try:
                status = await self.send(self.url, body, headers)
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
            except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
            done = self.clock()
            retry_at = None
            if error is not None:
                backoff = timedelta(seconds=self.interval * 2 ** min(item.attempts, 16))
                retry_at = done + min(backoff, MAX_BACKOFF)
                log.warning(
                    "alert %s not delivered (%s); again at %s", item.delivery_id, error, retry_at
                )
            else:
                delivered += 1
            await self.store.finish_alert(item.delivery_id, done, error=error, retry_at=retry_at)
        return delivered

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        if self._send is not None:
            return await self._send(url, body, headers)
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=SEND_TIMEOUT)
            self._session = aiohttp.ClientSession(timeout=timeout)
        async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as r:
            await r.read()
            return r.status

    async def run(self) -> None:
        """Scan and deliver until cancelled, as two loops (a slow webhook never delays the
        next cap-hit alert being raised); a database outage or an unexpected error only delays
        them."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._loop("scan", self._scan_once, wakes=True))
                group.create_task(self._loop("delivery", self.deliver, wakes=False))
        finally:
            if self._session is not None:
                await self._session.close()

    async def _scan_once(self) -> int:
        raised = await self.scan()
        if raised:
            self._delivered.set()  # send them now, not at the next interval
        return raised

    async def _loop(self, name: str, step: Callable[[], Awaitable[int]], *, wakes: bool) -> None:
        event = self._wake if wakes else self._delivered
        while True:
            try:
                await step()
            except StoreUnavailable:
                pass  # the database is away: the next round tries again
            except Exception:  # never let one bad round end alerting for the process
                log.exception("alert %s failed", name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), self.interval)
            event.clear()
            if wakes:
                await asyncio.sleep(MIN_GAP)  # a rate limit under a cap-hit storm
