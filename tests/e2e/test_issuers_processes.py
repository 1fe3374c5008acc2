"""An issuer's active-key limit raced over the two workers (processes) of one
`keybrake serve --workers 2`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.proxyproc import start_proxy
from tests.test_issuers import _active, _issuer_on, _race


def test_the_active_key_limit_is_exact_across_two_workers(tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, workers=2)
    try:
        issuer = _issuer_on(proxy, max_active_keys=5)
        statuses = asyncio.run(_race(proxy, issuer["issuer_token"], 40))
        active = _active(proxy)
    finally:
        proxy.stop()
    assert statuses == {201: 5, 403: 35}
    assert len(active) == 5
