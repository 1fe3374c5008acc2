"""A call rate across processes and replicas: 300 calls at once under `max_calls_per_minute: 60`
put exactly 60 at the vendor, whether two `keybrake serve --workers` processes share one SQLite
file or three replicas share one PostgreSQL database. The burst takes seconds, well inside the
minute, so the 61st call onwards are all refused with a 429 to wait on (the SDK's
RateLimitError), never a cap hit."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes.stripe_upstream import FakeStripe
from tests.helpers import FanOutResult, fan_out
from tests.proxyproc import ProxyProcess, start_proxy
from tests.served import ServedProxy
from tests.test_replicas import replicas, stop_all

POLICY = {"max_calls_per_minute": 60}


def assert_exactly_sixty(result: FanOutResult, vendor: FakeStripe) -> None:
    assert len(result.succeeded) == 60
    assert result.kinds() == {"RateLimitError": 240}
    for error in result.errors:
        assert error.headers is not None
        assert error.headers["X-Keybrake-Rate-Limited"] == "true"
        assert int(error.headers["Retry-After"]) >= 1
        assert "X-Keybrake-Cap-Hit" not in error.headers
    assert vendor.count("POST", "/v1/payment_intents") == 60


def test_two_sqlite_workers_put_exactly_the_rate_at_the_vendor(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    proxy: ProxyProcess = start_proxy(tmp_path, stripe_base=fake_stripe.url, workers=2)
    try:
        key = proxy.issue(daily_usd_cap=1000, constraints=POLICY)
        result = fan_out(key["vault_key"], proxy.url + "/stripe", 300, run="rate-workers")
    finally:
        proxy.stop()
    assert_exactly_sixty(result, fake_stripe)


@pytest.mark.postgres
def test_three_postgres_replicas_put_exactly_the_rate_at_the_vendor(
    tmp_path: Path, fake_stripe: FakeStripe, pg_url: str
) -> None:
    procs: list[ServedProxy] = replicas(tmp_path, 3, fake_stripe.url, pg_url)
    try:
        key = procs[0].issue(daily_usd_cap=1000, constraints=POLICY)
        bases = [proc.url + "/stripe" for proc in procs]
        result = fan_out(key["vault_key"], bases, 300, run="rate-replicas")
    finally:
        stop_all(procs)
    assert_exactly_sixty(result, fake_stripe)
