"""Vendor calls through a corporate CONNECT proxy: the proxy app on a real socket (served from a
thread of the test process), the Stripe SDK as the client, an HTTPS Stripe-shaped upstream with a
certificate from a test CA, and a local CONNECT proxy that records what it relayed. The real
secret crosses the corporate proxy only inside the TLS tunnel."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import stripe

from tests.fakes.connect_proxy import ConnectProxy
from tests.fakes.pki import CertificateAuthority
from tests.fakes.stripe_upstream import FakeStripe
from tests.proxyproc import STRIPE_SECRET
from tests.served import ServedProxy, serve_proxy


@pytest.fixture
def tls_stripe(tmp_path: Path) -> Iterator[tuple[FakeStripe, CertificateAuthority]]:
    ca = CertificateAuthority(tmp_path / "vendor-pki", "vendor test CA")
    serving = ca.server_cert("api.stripe")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(serving.cert_file, serving.key_file)
    server = FakeStripe(ssl_context=context)
    yield server, ca
    server.release()
    server.stop()


@pytest.fixture
def corporate_proxy() -> Iterator[ConnectProxy]:
    proxy = ConnectProxy()
    yield proxy
    proxy.stop()


def charge(proxy: ServedProxy) -> str:
    key = proxy.issue(daily_usd_cap=100)
    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": proxy.url + "/stripe"}, max_network_retries=0
    )
    intent = client.v1.payment_intents.create(params={"amount": 700, "currency": "usd"})
    return str(intent.id)


def start(
    tmp_path: Path,
    upstream: str,
    ca: CertificateAuthority,
    monkeypatch: pytest.MonkeyPatch,
    **env: str,
) -> ServedProxy:
    """The proxy with `env` in its environment (KEYBRAKE_* settings, HTTPS_PROXY, NO_PROXY) until
    `monkeypatch` undoes it."""
    # The vendor's certificate is checked against the test CA (OpenSSL's SSL_CERT_FILE), as it
    # would be against the system's for api.stripe.com: the proxy makes its verifying context
    # when it starts, with the variable set.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))
    for name, value in env.items():
        if not name.startswith("KEYBRAKE_"):
            monkeypatch.setenv(name, value)
    return serve_proxy(
        tmp_path,
        stripe_base=upstream.replace("127.0.0.1", "localhost"),
        extra_env={k: v for k, v in env.items() if k.startswith("KEYBRAKE_")},
    )


@pytest.mark.parametrize("setting", ["KEYBRAKE_UPSTREAM_PROXY", "HTTPS_PROXY"])
def test_a_vendor_call_goes_through_the_connect_proxy_as_tls(
    setting: str,
    tmp_path: Path,
    tls_stripe: tuple[FakeStripe, CertificateAuthority],
    corporate_proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, ca = tls_stripe
    proxy = start(tmp_path, upstream.url, ca, monkeypatch, **{setting: corporate_proxy.url})
    try:
        assert charge(proxy).startswith("pi_")
    finally:
        proxy.stop()
    [request] = upstream.requests
    assert request["headers"]["authorization"] == f"Bearer {STRIPE_SECRET}"
    assert corporate_proxy.targets == [f"localhost:{upstream.port}"]  # it went that way
    assert corporate_proxy.refused == []
    relayed = bytes(corporate_proxy.relayed)
    assert relayed.startswith(b"\x16\x03")  # a TLS handshake record, not an HTTP request
    assert STRIPE_SECRET.encode() not in relayed and b"payment_intents" not in relayed


def test_no_proxy_and_plain_http_vendors_go_direct(
    tmp_path: Path,
    tls_stripe: tuple[FakeStripe, CertificateAuthority],
    corporate_proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, ca = tls_stripe
    with monkeypatch.context() as env:  # this proxy's environment, not the next one's
        proxy = start(
            tmp_path, upstream.url, ca, env, HTTPS_PROXY=corporate_proxy.url, NO_PROXY="localhost"
        )
        try:
            assert charge(proxy).startswith("pi_")
        finally:
            proxy.stop()
    assert corporate_proxy.targets == [] and len(upstream.requests) == 1

    # A plain-http vendor base (a test upstream) is never proxied: the proxy would read the secret.
    plain = FakeStripe()
    (tmp_path / "plain").mkdir()
    try:
        direct = serve_proxy(
            tmp_path / "plain",
            stripe_base=plain.url,
            extra_env={"KEYBRAKE_UPSTREAM_PROXY": corporate_proxy.url},
        )
        try:
            assert charge(direct).startswith("pi_")
        finally:
            direct.stop()
    finally:
        plain.release()
        plain.stop()
    assert corporate_proxy.targets == [] and corporate_proxy.refused == []


def test_a_bad_upstream_proxy_setting_is_refused_at_start(tmp_path: Path) -> None:
    from keybrake.proxy.settings import Settings

    with pytest.raises(ValueError, match="CONNECT proxy"):
        Settings(upstream_proxy="socks5://proxy:1080")  # type: ignore[arg-type]
    settings = Settings(upstream_proxy="http://user:pw@proxy.corp:3128")  # type: ignore[arg-type]
    assert "pw" not in repr(settings)
