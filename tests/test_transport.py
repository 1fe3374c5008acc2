"""Transport and exposure: `keybrake serve` refusing a TLS certificate it cannot use, and /metrics
behind a bearer token. TLS served by `keybrake serve` (checked by the client, rotated in place
and picked up at the next handshake, in every worker; the CLI with a CA bundle) is in
tests/e2e/test_transport_processes.py."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from keybrake.cli.main import app
from tests.fakes.pki import CertificateAuthority
from tests.inproc import Clock, app_client
from tests.proxyproc import ADMIN_KEY


def test_serve_refuses_a_certificate_it_cannot_use(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cert = ca.server_cert("proxy")
    other = ca.server_cert("other")
    runner = CliRunner()
    for env, message in (
        ({"KEYBRAKE_TLS_CERT_FILE": str(cert.cert_file)}, "go together"),
        (
            {
                "KEYBRAKE_TLS_CERT_FILE": str(cert.cert_file),
                "KEYBRAKE_TLS_KEY_FILE": str(other.key_file),
            },
            "cannot use the TLS certificate",
        ),
    ):
        result = runner.invoke(
            app,
            ["serve", "--port", "0"],
            env={
                "KEYBRAKE_API_KEY": ADMIN_KEY,
                "KEYBRAKE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
                **env,
            },
        )
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert "Traceback" not in result.output


def test_metrics_can_require_a_token(tmp_path: Path) -> None:
    with app_client(tmp_path / "open", Clock()) as client:
        assert client.get("/metrics", headers={"Authorization": ""}).status_code == 200
    (tmp_path / "closed").mkdir()
    with app_client(tmp_path / "closed", Clock(), metrics_token="scrape-me") as client:
        anonymous = client.get("/metrics", headers={"Authorization": ""})
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        admin = client.get("/metrics")  # the admin token is not the metrics token
        scraper = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert anonymous.status_code == wrong.status_code == admin.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert scraper.status_code == 200 and "keybrake_" in scraper.text
