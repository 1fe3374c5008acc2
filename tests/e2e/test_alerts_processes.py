"""Threshold alerts across a restart: a `keybrake serve` process raises them while the receiver
is down and is stopped (SIGTERM) with nothing delivered; the proxy started on its database (the
app served from a thread of the test process) delivers them once the receiver is up. After
dropping repeats by delivery id, each crossing arrives exactly once: the outbox is in the
database."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.webhook import WebhookReceiver
from tests.proxyproc import ProxyProcess, start_proxy
from tests.test_alerts import alerting_env, alerting_proxy, charge, eventually, marks


def alerting_process(
    tmp_path: Path, fake_stripe: FakeStripe, receiver: WebhookReceiver
) -> ProxyProcess:
    return start_proxy(tmp_path, stripe_base=fake_stripe.url, extra_env=alerting_env(receiver))


def test_a_receiver_down_then_up_across_a_restart_gets_each_alert_once(
    tmp_path: Path, fake_stripe: FakeStripe, receiver: WebhookReceiver
) -> None:
    receiver.down = True
    proxy = alerting_process(tmp_path, fake_stripe, receiver)
    try:
        key = proxy.issue(daily_usd_cap=10, dedupe_window="0")
        assert charge(proxy, key, 900, 1) == 200  # 50 % and 80 % at once
        eventually(lambda: receiver.refused >= 2, "delivery attempts to a receiver that is down")

        def failing() -> list[dict[str, Any]]:
            with proxy.admin() as admin:
                return list(admin.get("/vault/alerts", params={"pending": "true"}).json()["data"])

        eventually(lambda: len(failing()) == 2 and all(a["attempts"] for a in failing()), "retries")
        assert {a["last_error"] for a in failing()} == {"HTTP 503"}
        metrics = httpx.get(f"{proxy.url}/metrics").text
        assert "keybrake_alerts_failing 2.0" in metrics
    finally:
        proxy.stop()  # nothing delivered yet: the outbox is in the database
    receiver.down = False
    restarted = alerting_proxy(tmp_path, fake_stripe, receiver)
    try:
        eventually(lambda: sorted(marks(receiver)) == ["50%", "80%"], "delivery after the restart")
        with restarted.admin() as admin:
            assert admin.get("/vault/alerts", params={"pending": "true"}).json()["data"] == []
        assert "keybrake_alerts_failing 0.0" in httpx.get(f"{restarted.url}/metrics").text
    finally:
        restarted.stop()
    assert Counter(marks(receiver)) == {"50%": 1, "80%": 1}  # after dropping repeats by id
    assert all(json.loads(r.body)["delivery_id"] for r in receiver.received)
