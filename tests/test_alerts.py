"""Threshold alerts: the crossing rule case by case, the outbox on both backends, and the proxy
app on a loopback socket POSTing to a webhook receiver; counted after dropping repeats by delivery
id, each crossing arrives exactly once. A receiver down, then up, across a restart of a
`keybrake serve` process: tests/e2e/test_alerts_processes.py."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from keybrake.cli.main import app
from keybrake.proxy import alerts
from keybrake.proxy.alerts import CAP_HIT, crossings
from keybrake.proxy.store import open_store
from keybrake.proxy.store.records import AlertDelivery, AlertLevel
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.webhook import WebhookReceiver
from tests.proxyproc import ProxyProcess
from tests.served import ServedProxy, serve_proxy

SECRET = "whsec-test-alerts"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

# Made once: httpx loads the CA bundle anew for every call's client (~50 ms) otherwise, though
# these calls are plain http.
TLS = ssl.create_default_context()


def level(window: int, daily: int | None = 10_000_000, life: int = 0, total: int | None = None,
          hits: int = 0) -> AlertLevel:  # fmt: skip
    return AlertLevel("vk_1", "key", "argo/run", "argo", "stripe", window, daily, life, total, hits)


@pytest.mark.parametrize(
    ("case", "subject", "marked", "raised", "rearmed"),
    [
        ("below every threshold", level(4_999_999), set(), [], []),
        ("exactly 50 %", level(5_000_000), set(), ["50%"], []),
        ("two at once", level(8_500_000), set(), ["50%", "80%"], []),
        ("already raised", level(8_500_000), {"50%", "80%"}, [], []),
        ("fell back below 80", level(7_000_000), {"50%", "80%"}, [], ["80%"]),
        (
            "the total cap counts too",
            level(0, daily=None, life=9_000_000, total=10_000_000),
            set(),
            ["50%", "80%"],
            [],
        ),
        ("first cap hit", level(10_000_000, hits=1), {"50%", "80%", "100%"}, [CAP_HIT], []),
        ("a later cap hit", level(10_000_000, hits=5), {"50%", "80%", "100%", CAP_HIT}, [], []),
        # a budget's cap hits count its keys' own refusals: its 100 % threshold speaks for it
        (
            "a budget's cap hits",
            AlertLevel(
                "bg_1", "budget", "argo/run", "argo", None, 1_000_000, 10_000_000, 0, None, 3
            ),
            set(),
            [],
            [],
        ),
    ],
)
def test_the_crossing_rule(
    case: str, subject: AlertLevel, marked: set[str], raised: list[str], rearmed: list[str]
) -> None:
    new, rearm = crossings(subject, [50, 80, 100], marked)
    assert [c.mark for c in new] == raised
    assert rearm == rearmed


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'alerts.db'}"
    else:
        from tests.pg import pg_database

        with pg_database() as url:
            yield url


def test_the_outbox_raises_once_and_retries_until_delivered(database_url: str) -> None:
    async def run() -> None:
        store = open_store(database_url)
        await store.open()
        try:

            def delivery(n: int) -> AlertDelivery:
                return AlertDelivery(f"al_{n}", "vk_1", "80%", '{"text":"x"}', NOW)

            raised = await asyncio.gather(*(store.raise_alert(delivery(n)) for n in range(4)))
            assert sorted(raised) == [False, False, False, True]  # one replica wins
            [claimed] = await store.claim_alerts(NOW, timedelta(seconds=60), 10)
            assert await store.claim_alerts(NOW, timedelta(seconds=60), 10) == []  # leased
            await store.finish_alert(
                claimed.delivery_id, NOW, error="HTTP 503", retry_at=NOW + timedelta(seconds=30)
            )
            assert await store.claim_alerts(NOW + timedelta(seconds=29), timedelta(60), 10) == []
            [again] = await store.claim_alerts(NOW + timedelta(seconds=30), timedelta(60), 10)
            assert again.attempts == 1 and again.delivery_id == claimed.delivery_id
            await store.finish_alert(again.delivery_id, NOW, error=None, retry_at=None)
            [done] = await store.alert_deliveries(pending=False, limit=10)
            assert done.delivered_at is not None and done.attempts == 2
            assert await store.alert_deliveries(pending=True, limit=10) == []
            await store.rearm_alerts("vk_1", ["80%"])
            assert await store.alert_marks() == set()
        finally:
            await store.close()

    asyncio.run(run())


def alerting_env(receiver: WebhookReceiver) -> dict[str, str]:
    return {
        "KEYBRAKE_ALERT_WEBHOOK_URL": receiver.url,
        "KEYBRAKE_ALERT_WEBHOOK_SECRET": SECRET,
        "KEYBRAKE_ALERT_INTERVAL": "0.2",
    }


def alerting_proxy(
    tmp_path: Path, fake_stripe: FakeStripe, receiver: WebhookReceiver
) -> ServedProxy:
    return serve_proxy(tmp_path, stripe_base=fake_stripe.url, extra_env=alerting_env(receiver))


def charge(proxy: ProxyProcess | ServedProxy, key: dict[str, Any], cents: int, n: int) -> int:
    answer = httpx.post(
        f"{proxy.url}/stripe/v1/payment_intents",
        data={"amount": str(cents), "currency": "usd", "metadata[n]": str(n)},
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        verify=TLS,
    )
    return answer.status_code


def eventually(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling an observable condition, not waiting out a duration


def marks(receiver: WebhookReceiver) -> list[str]:
    return [
        "cap_hit" if r.json["event"] == "cap_hit" else f"{r.json['threshold_percent']}%"
        for r in receiver.unique()
    ]


def test_each_crossing_alerts_once_and_a_raise_re_arms(
    tmp_path: Path,
    fake_stripe: FakeStripe,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The scan loop rests MIN_GAP (1 s) after each scan, a rate limit under a storm of cap hits;
    # here it would be most of the test's time, each step waiting for the next scan. Without it,
    # the scans come every KEYBRAKE_ALERT_INTERVAL (0.2 s), and as often may raise one twice.
    monkeypatch.setattr(alerts, "MIN_GAP", 0.0)
    proxy = alerting_proxy(tmp_path, fake_stripe, receiver)
    try:
        key = proxy.issue(daily_usd_cap=10, dedupe_window="0", agent_run_label="argo/alerted")
        assert charge(proxy, key, 600, 1) == 200  # $6 of $10
        eventually(lambda: marks(receiver) == ["50%"], "the 50 % alert")
        assert charge(proxy, key, 300, 2) == 200  # $9
        eventually(lambda: marks(receiver) == ["50%", "80%"], "the 80 % alert")
        assert charge(proxy, key, 200, 3) == 429  # over the cap: refused
        eventually(lambda: marks(receiver) == ["50%", "80%", "cap_hit"], "the cap-hit alert")
        assert charge(proxy, key, 100, 4) == 200  # exactly $10
        eventually(lambda: len(marks(receiver)) == 4, "the 100 % alert")
        # Raising the cap puts spend back below every threshold: they re-arm.
        with proxy.admin() as admin:
            patched = admin.patch(
                f"/vault/keys/{key['key_id']}", json={"daily_usd_cap": 40, "reason": "busy day"}
            )
            assert patched.status_code == 200
        eventually(lambda: _marks_left(proxy) == {"cap_hit"}, "the thresholds to re-arm")
        assert charge(proxy, key, 1100, 5) == 200  # $21 of $40: past 50 % again
        eventually(lambda: marks(receiver)[-1:] == ["50%"], "the 50 % alert again")
        with proxy.admin() as admin:
            listed = admin.get("/vault/alerts").json()["data"]
        shown = CliRunner().invoke(
            app,
            ["alerts", "-o", "table"],
            env={"KEYBRAKE_URL": proxy.url, "KEYBRAKE_API_KEY": proxy.admin_key, "COLUMNS": "200"},
        )
        assert shown.exit_code == 0 and shown.stdout.count("delivered") == 5
        assert key["key_id"] in shown.stdout and "cap_hit" in shown.stdout
    finally:
        proxy.stop()
    got = receiver.unique()
    assert Counter(marks(receiver)) == {"50%": 2, "80%": 1, "100%": 1, "cap_hit": 1}
    assert all(r.signed_by(SECRET.encode()) for r in got)
    first = got[0].json
    assert (
        first["text"].startswith("keybrake: key ")
        and "reached 50% of its $10.00 24-hour cap" in first["text"]
    )
    assert first["subject"]["label"] == "argo/alerted" and first["spent_usd"] == "6.00"
    assert first["delivery_id"] == got[0].headers["x-keybrake-delivery"]
    assert {a["status"] for a in listed} == {"delivered"} and len(listed) == 5


def _marks_left(proxy: ServedProxy) -> set[str]:
    import sqlite3

    path = proxy.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT mark FROM alert_marks")}


def test_webhook_urls_come_from_the_operator_only(tmp_path: Path) -> None:
    from tests.inproc import app_client

    with app_client(tmp_path) as admin:
        answer = admin.post(
            "/vault/keys",
            json={
                "vendor": "stripe",
                "daily_usd_cap": 10,
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "agent_run_label": "argo/x",
                "alert_webhook_url": "http://169.254.169.254/latest/meta-data",
            },
        )
    assert answer.status_code == 400 and "alert_webhook_url" in answer.text


def test_own_thresholds_are_kept_and_ended_subjects_marks_forgotten(database_url: str) -> None:
    """A key's or budget's own thresholds reach the alert scan on both backends (None: the
    operator's), and the marks of revoked or expired ones are dropped by maintenance."""
    from keybrake.proxy.store.records import BudgetRecord, Event, KeyRecord

    event = Event(ts=NOW, action="key.issue", actor="admin", outcome="ok")

    def key(key_id: str, percents: tuple[int, ...] | None, ttl: timedelta) -> KeyRecord:
        return KeyRecord(
            key_id=key_id,
            key_hash=key_id.encode().ljust(32, b"-"),
            vendor="stripe",
            label="argo/own",
            daily_cap_micros=10_000_000,
            max_per_call_micros=None,
            allowed_endpoints=("POST /v1/payment_intents",),
            metadata={},
            dedupe_window_s=0,
            created_at=NOW - timedelta(minutes=1),
            expires_at=NOW + ttl,
            alert_percents=percents,
        )

    async def run() -> None:
        store = open_store(database_url)
        await store.open()
        try:
            await store.create_key(key("vk_own", (25, 90), timedelta(hours=1)), event)
            await store.create_key(key("vk_default", None, timedelta(hours=1)), event)
            await store.create_key(key("vk_ended", (50,), timedelta(seconds=30)), event)
            await store.create_budget(
                BudgetRecord(
                    budget_id="bg_quiet",
                    label="argo/own",
                    daily_cap_micros=None,
                    total_cap_micros=5_000_000,
                    metadata={},
                    created_at=NOW - timedelta(minutes=1),
                    expires_at=NOW + timedelta(hours=1),
                    alert_percents=(),
                ),
                event,
            )
            levels = {level.owner_id: level for level in await store.alert_levels(NOW)}
            assert levels["vk_own"].percents == (25, 90)
            assert levels["vk_default"].percents is None
            assert levels["bg_quiet"].percents == ()
            view = await store.get_key("vk_own", NOW)
            assert view is not None and view.key.alert_percents == (25, 90)
            # What the scan raises at 30 % of the cap: its own 25 %, never the default 50 %.
            spent = replace(levels["vk_own"], window_micros=3_000_000)
            assert [c.mark for c in crossings(spent, [50, 80, 100], set())[0]] == ["25%"]

            for owner in ("vk_own", "vk_ended", "bg_quiet"):
                await store.raise_alert(AlertDelivery(f"al_{owner}", owner, "25%", "{}", NOW))
            await store.revoke_budget("bg_quiet", NOW, event)
            # vk_ended expired at NOW + 30 s and bg_quiet was revoked at NOW: nothing ended
            # before NOW goes; ended before a minute later, both go.
            assert await store.forget_alert_marks(NOW - timedelta(seconds=1)) == 0
            assert await store.forget_alert_marks(NOW + timedelta(minutes=1)) == 2
            assert await store.alert_marks() == {("vk_own", "25%")}
        finally:
            await store.close()

    asyncio.run(run())


def test_thresholds_are_set_at_issue_and_checked(tmp_path: Path) -> None:
    from tests.inproc import app_client, issue

    with app_client(tmp_path) as client:
        own = issue(client, alert_thresholds=[90, 25])
        assert own["alert_thresholds"] == [25, 90]
        assert client.get(f"/vault/keys/{own['key_id']}").json()["alert_thresholds"] == [25, 90]
        assert issue(client)["alert_thresholds"] is None  # the operator's
        budget = client.post(
            "/vault/budgets",
            json={"agent_run_label": "argo/x", "total_usd_cap": 5, "alert_thresholds": []},
        ).json()
        assert budget["alert_thresholds"] == []
        for bad in ([0], [101], [50, 50], list(range(1, 12)), ["half"]):
            answer = client.post(
                "/vault/keys",
                json={
                    "vendor": "stripe",
                    "daily_usd_cap": 5,
                    "allowed_endpoints": ["POST /v1/payment_intents"],
                    "agent_run_label": "argo/x",
                    "alert_thresholds": bad,
                },
            )
            assert answer.status_code == 400 and "alert_thresholds" in answer.text, bad


def test_the_cli_sets_own_thresholds(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    proxy = serve_proxy(tmp_path, stripe_base=fake_stripe.url)
    env = {"KEYBRAKE_URL": proxy.url, "KEYBRAKE_API_KEY": proxy.admin_key}
    try:
        runner = CliRunner()
        made = runner.invoke(
            app,
            [
                "keys",
                "issue",
                "--vendor",
                "stripe",
                "--allow",
                "POST /v1/payment_intents",
                "--label",
                "argo/cli",
                "--daily-usd-cap",
                "5",
                "--alert-at",
                "90,25",
                "-o",
                "json",
            ],
            env=env,
        )
        assert made.exit_code == 0, made.output
        assert json.loads(made.stdout)["alert_thresholds"] == [25, 90]
        quiet = runner.invoke(
            app,
            [
                "budgets",
                "create",
                "--label",
                "argo/cli",
                "--total-usd-cap",
                "5",
                "--alert-at",
                "none",
                "-o",
                "json",
            ],
            env=env,
        )
        assert quiet.exit_code == 0 and json.loads(quiet.stdout)["alert_thresholds"] == []
        bad = runner.invoke(
            app,
            [
                "budgets",
                "create",
                "--label",
                "argo/cli",
                "--total-usd-cap",
                "5",
                "--alert-at",
                "half",
            ],
            env=env,
        )
        assert bad.exit_code == 2 and "--alert-at 'half'" in bad.output
        assert "Traceback" not in bad.output
    finally:
        proxy.stop()
