from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import Localstripe, ProxyProcess, start_localstripe, start_proxy


@pytest.fixture(scope="session")
def localstripe() -> Iterator[Localstripe]:
    """One localstripe process for the session (a GPL program: only ever run as a process)."""
    ls = start_localstripe()
    yield ls
    ls.stop()


@pytest.fixture
def fresh_localstripe() -> Iterator[Localstripe]:
    """A localstripe of its own, for tests that count every object it holds."""
    ls = start_localstripe()
    yield ls
    ls.stop()


@pytest.fixture
def proxy_server(tmp_path: Path, localstripe: Localstripe) -> Iterator[ProxyProcess]:
    """`keybrake serve` on a free loopback port, its own SQLite file, localstripe upstream."""
    proxy = start_proxy(tmp_path, stripe_base=localstripe.url)
    yield proxy
    proxy.stop()


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    server = FakeStripe()
    yield server
    server.release()
    server.stop()


@pytest.fixture
def fake_proxy(tmp_path: Path, fake_stripe: FakeStripe) -> Iterator[ProxyProcess]:
    """`keybrake serve` in front of the Stripe-shaped fake (Request-Id, faults, counting)."""
    proxy = start_proxy(
        tmp_path, stripe_base=fake_stripe.url, extra_env={"KEYBRAKE_UPSTREAM_TIMEOUT": "2"}
    )
    yield proxy
    proxy.stop()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (skips without a server, fails instead in CI)."""
    from tests.pg import pg_database

    with pg_database() as url:
        yield url


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Commands run in-process (CliRunner) may set KEYBRAKE_* variables; no test sees another's."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
