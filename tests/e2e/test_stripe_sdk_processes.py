"""The Stripe SDK contract where the `keybrake serve` process is the point: `serve --loop uvloop`
(the event loop is a serve flag) and `serve --workers 2` over one SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.proxyproc import Localstripe, start_proxy
from tests.test_stripe_sdk import (
    assert_500_concurrent_intents_against_300_cap_are_exact,
    fan_out,
)


# `serve --loop`: both are supported. asyncio, the default (which every other `keybrake serve`
# test runs on), has this test in tests/test_stripe_sdk.py, the app served from a thread.
@pytest.mark.parametrize("loop", ["uvloop"])
def test_500_concurrent_intents_against_300_cap_are_exact(
    tmp_path: Path, fresh_localstripe: Localstripe, loop: str
) -> None:
    proxy = start_proxy(tmp_path, stripe_base=fresh_localstripe.url, loop=loop)
    try:
        assert_500_concurrent_intents_against_300_cap_are_exact(proxy, fresh_localstripe)
    finally:
        proxy.stop()


def test_two_workers_over_one_sqlite_file_stay_exact(
    tmp_path: Path, localstripe: Localstripe
) -> None:
    proxy = start_proxy(tmp_path, stripe_base=localstripe.url, workers=2)
    try:
        key = proxy.issue(daily_usd_cap=100)
        result = fan_out(key["vault_key"], proxy.url + "/stripe", 250, run="workers")
        assert len(result.succeeded) == 100
        assert result.kinds() == {"RateLimitError": 150}
        with proxy.admin() as admin:
            info = admin.get(f"/vault/keys/{key['key_id']}").json()
        assert (info["spent_usd"], info["reserved_usd"], info["calls"]) == ("100.00", "0.00", 250)
    finally:
        proxy.stop()
