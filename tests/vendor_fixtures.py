"""Fixtures for the Twilio and Resend tests: the upstream fakes and the proxy with all three
vendors in front of them (served from a thread of the test process). Test modules load them with
`pytest_plugins = ["tests.vendor_fixtures"]` (and import helpers from tests.vendor_helpers).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.resend_upstream import FakeResend
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.twilio_upstream import FakeTwilio
from tests.served import ServedProxy
from tests.vendor_helpers import serve_vendor_proxy


@pytest.fixture
def fake_twilio() -> Iterator[FakeTwilio]:
    server = FakeTwilio()
    yield server
    server.stop()


@pytest.fixture
def fake_resend() -> Iterator[FakeResend]:
    server = FakeResend()
    yield server
    server.stop()


@pytest.fixture
def vendor_proxy(
    tmp_path: Path, fake_stripe: FakeStripe, fake_twilio: FakeTwilio, fake_resend: FakeResend
) -> Iterator[ServedProxy]:
    proxy = serve_vendor_proxy(tmp_path, fake_stripe, fake_twilio, fake_resend)
    yield proxy
    proxy.stop()
