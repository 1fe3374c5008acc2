"""Nothing lost on crashes: answered calls are audited durably, in-flight reservations stay. The
crash is a kill -9 of a `keybrake serve` process; the proxy started on its database afterwards is
the app served from a thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import httpx

from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import start_proxy
from tests.served import serve_proxy


def test_kill_9_loses_no_answered_call_and_keeps_in_flight_reservations(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    proxy = start_proxy(tmp_path, stripe_base=fake_stripe.url)
    key = proxy.issue(daily_usd_cap=100)
    auth = {"Authorization": f"Bearer {key['vault_key']}"}
    url = f"{proxy.url}/stripe/v1/payment_intents"
    for i in range(40):
        response = httpx.post(
            url, data={"amount": "100", "currency": "usd", "metadata[i]": str(i)}, headers=auth
        )
        assert response.status_code == 200

    fake_stripe.arrived.clear()
    fake_stripe.hold()
    outcome: list[str] = []

    def call_in_flight() -> None:
        try:
            httpx.post(url, data={"amount": "700", "currency": "usd"}, headers=auth, timeout=30)
            outcome.append("answered")
        except httpx.HTTPError:
            outcome.append("connection lost")

    in_flight = threading.Thread(target=call_in_flight)
    in_flight.start()
    assert fake_stripe.arrived.wait(timeout=30)  # the call is reserved and at the vendor
    proxy.kill9()
    fake_stripe.release()
    in_flight.join()
    assert outcome == ["connection lost"]

    db = sqlite3.connect(tmp_path / "keybrake.db")
    decisions = dict(
        db.execute("SELECT decision, count(*) FROM audit GROUP BY decision").fetchall()
    )
    settled, reserved = db.execute(
        "SELECT sum(settled_micros), sum(reserved_micros) FROM spend_window"
    ).fetchone()
    db.close()
    assert decisions == {"forwarded": 40, "in_flight": 1}
    assert settled == 40_000_000
    assert reserved == 7_000_000  # still counted against the cap after the crash

    restarted = serve_proxy(tmp_path, stripe_base=fake_stripe.url)
    try:
        with restarted.admin() as admin:
            info = admin.get(f"/vault/keys/{key['key_id']}").json()
        assert info["spent_usd"] == "40.00" and info["reserved_usd"] == "7.00"
        assert info["remaining_usd"] == "53.00"
    finally:
        restarted.stop()
