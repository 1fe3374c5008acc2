"""Transport where `keybrake serve` is the point: it serves TLS with a certificate made in the test
(checked by the client, rotated in place and picked up at the next handshake, in every worker of
`--workers 2`), and the CLI checks an https proxy against its CA bundle."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from typer.testing import CliRunner

from keybrake.cli.main import app
from tests.fakes.pki import CertificateAuthority
from tests.proxyproc import ADMIN_KEY, start_proxy


def served_serial(url: str, ca_file: Path) -> int:
    host, port = url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_tls_is_served_checked_and_rotated_in_place(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    first = ca.server_cert("proxy")
    env = {
        "KEYBRAKE_TLS_CERT_FILE": str(first.cert_file),
        "KEYBRAKE_TLS_KEY_FILE": str(first.key_file),
    }
    proxy = start_proxy(tmp_path, workers=2, extra_env=env, ca_file=ca.ca_file)
    try:
        assert proxy.url.startswith("https://")
        with proxy.admin() as admin:
            assert admin.get("/vault/keys").status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(proxy.url + "/healthz")  # a client that does not know the CA refuses it
        before = {served_serial(proxy.url, ca.ca_file) for _ in range(6)}
        second = ca.server_cert("proxy")  # cert-manager writes the new pair over the old
        after = {served_serial(proxy.url, ca.ca_file) for _ in range(6)}
        with proxy.admin() as admin:
            assert admin.get("/readyz").status_code == 200
    finally:
        proxy.stop()
    assert before == {first.serial}
    assert after == {second.serial}  # every worker, at its next handshake, no restart


def test_the_cli_checks_an_https_proxy_against_its_ca_bundle(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cert = ca.server_cert("proxy")
    env = {
        "KEYBRAKE_TLS_CERT_FILE": str(cert.cert_file),
        "KEYBRAKE_TLS_KEY_FILE": str(cert.key_file),
    }
    proxy = start_proxy(tmp_path, extra_env=env, ca_file=ca.ca_file)
    runner = CliRunner()
    base = {"KEYBRAKE_URL": proxy.url, "KEYBRAKE_API_KEY": ADMIN_KEY}
    try:
        trusted = runner.invoke(
            app, ["keys", "list", "-o", "json"], env={**base, "KEYBRAKE_CA_BUNDLE": str(ca.ca_file)}
        )
        flag = runner.invoke(
            app, ["--ca-bundle", str(ca.ca_file), "keys", "list", "-o", "json"], env=base
        )
        untrusted = runner.invoke(app, ["keys", "list"], env=base)
        missing = runner.invoke(
            app, ["keys", "list"], env={**base, "KEYBRAKE_CA_BUNDLE": str(tmp_path / "nope.pem")}
        )
    finally:
        proxy.stop()
    assert trusted.exit_code == flag.exit_code == 0 and trusted.stdout.strip() == "[]"
    assert untrusted.exit_code == 3 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
    assert missing.exit_code == 2 and "KEYBRAKE_CA_BUNDLE" in missing.stderr
