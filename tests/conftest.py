from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

# A test run started in the background by a non-interactive shell inherits SIGINT ignored, and so
# would every process a test starts: the Ctrl-C tests could not interrupt them. Children of a
# process with a handler get the default action back when they start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.webhook import WebhookReceiver
from tests.proxyproc import Localstripe, start_localstripe
from tests.served import ServedProxy, serve_proxy


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
def bare_proxy(tmp_path: Path) -> Iterator[ServedProxy]:
    """The proxy app on a free loopback port, its own SQLite file, no vendor behind it: for what
    the admin API and the CLI do."""
    served = serve_proxy(tmp_path)
    yield served
    served.stop()


@pytest.fixture
def proxy_server(tmp_path: Path, localstripe: Localstripe) -> Iterator[ServedProxy]:
    """The proxy app on a free loopback port (served from a thread of the test process), its
    own SQLite file, localstripe upstream."""
    proxy = serve_proxy(tmp_path, stripe_base=localstripe.url)
    yield proxy
    proxy.stop()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A webhook receiver for alerts (it can be taken down and brought back)."""
    server = WebhookReceiver()
    yield server
    server.stop()


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    server = FakeStripe()
    yield server
    server.release()
    server.stop()


@pytest.fixture
def fake_proxy(tmp_path: Path, fake_stripe: FakeStripe) -> Iterator[ServedProxy]:
    """The proxy app on a loopback port in front of the Stripe-shaped fake (Request-Id, faults,
    counting)."""
    proxy = serve_proxy(
        tmp_path, stripe_base=fake_stripe.url, extra_env={"KEYBRAKE_UPSTREAM_TIMEOUT": "2"}
    )
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def pg_module_url() -> Iterator[str]:
    """One PostgreSQL database for a module's tests (skips without a server, fails in CI)."""
    from tests.pg import pg_database

    with pg_database() as url:
        yield url


@pytest.fixture
def pg_fresh_url(pg_module_url: str) -> str:
    """The module's database, emptied as a new one is: for tests that start from nothing."""
    from tests.pg import empty_database

    empty_database(pg_module_url)
    return pg_module_url


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


E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/e2e/ are marked `e2e` (`make test-fast` leaves them out), and with
    KEYBRAKE_TEST_BACKENDS=sqlite the PostgreSQL runs of every test are left out."""
    backends = os.environ.get("KEYBRAKE_TEST_BACKENDS", "sqlite,postgres").split(",")
    kept, dropped = [], []
    for item in items:
        if E2E in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)
        if "postgres" not in backends and _uses_postgres(item):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _uses_postgres(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(
        isinstance(value, str) and value == "postgres" for value in callspec.params.values()
    ):
        return True
    names = getattr(item, "fixturenames", ())
    return bool({"pg_url", "pg_module_url", "pg_fresh_url"} & set(names)) or (
        item.get_closest_marker("postgres") is not None
    )
