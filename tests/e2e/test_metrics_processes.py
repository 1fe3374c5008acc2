"""/metrics is right whichever worker a scrape reaches: `serve --workers 2` sums every worker's
counters (prometheus_client's multiprocess mode), and the database-read gauges are the same
everywhere and bounded (by vendor, never by run)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import start_proxy


def sample(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} ([0-9.e+]+)$", text, flags=re.M)
    assert match, f"{series} not in /metrics"
    return float(match.group(1))


def test_every_scrape_of_two_workers_counts_every_call(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    proxy = start_proxy(tmp_path, stripe_base=fake_stripe.url, workers=2)
    try:
        key = proxy.issue(daily_usd_cap=100, dedupe_window="0")
        for n in range(20):
            # A connection each, so the two workers both take calls.
            answer = httpx.post(
                f"{proxy.url}/stripe/v1/payment_intents",
                data={"amount": "100", "currency": "usd", "metadata[n]": str(n)},
                headers={"Authorization": f"Bearer {key['vault_key']}"},
            )
            assert answer.status_code == 200
        forwarded = 'keybrake_calls_total{decision="forwarded",vendor="stripe"}'
        for _ in range(8):
            text = httpx.get(f"{proxy.url}/metrics").text
            assert sample(text, forwarded) == 20.0
            assert sample(text, 'keybrake_upstream_seconds_count{vendor="stripe"}') == 20.0
            assert sample(text, 'keybrake_spend_usd{vendor="stripe"}') == 20.0
            assert sample(text, "keybrake_keys_active") == 1.0
            assert sample(text, "keybrake_database_up") == 1.0
            assert text.count("# TYPE keybrake_spend_usd gauge") == 1
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()
