"""Kubernetes service-account login: a projected token (signed by keys made in the test, served
by a fake cluster's OIDC discovery and JWKS over TLS) logs in as the issuer bound to its
namespace and service account; every way a token can be wrong is a 401 with an event row."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from starlette.testclient import TestClient

from keybrake.proxy import kubernetes
from keybrake.proxy.kubernetes import REFETCH_AFTER, ApiServer, JwksVerifier
from keybrake.proxy.settings import Settings
from tests.fakes.kubernetes import API_AUDIENCE, FakeCluster
from tests.inproc import Clock, app_client

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
BINDING = {"namespaces": ["payments"], "service_accounts": ["keybrake-issuer"]}
KEY = {
    "vendor": "stripe",
    "total_usd_cap": 50,
    "allowed_endpoints": ["POST /v1/payment_intents"],
    "expires_in": "1h",
    "agent_run_label": "argo/payments-nightly",
}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FakeCluster]:
    fake = FakeCluster(tmp_path)
    yield fake
    fake.stop()


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def proxy_token(cluster: FakeCluster, tmp_path: Path) -> Path:
    """The proxy's own service-account token, for reading the cluster's discovery and JWKS."""
    path = tmp_path / "proxy-token"
    path.write_text(cluster.token("keybrake", "keybrake", audience=API_AUDIENCE, lifetime=3600))
    return path


def jwks_verifier(cluster: FakeCluster, proxy_token: Path, ticks: Ticks) -> JwksVerifier:
    return JwksVerifier(
        issuer=cluster.issuer,
        api=ApiServer(cluster.url, cluster.ca_file, proxy_token),
        monotonic=ticks,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def setup_issuer(client: TestClient, **binding: Any) -> dict[str, Any]:
    response = client.post(
        "/vault/issuers",
        json={
            "name": "payments",
            "label_prefix": "argo/payments-",
            "kubernetes": {**BINDING, **binding},
        },
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_a_projected_token_logs_in_as_its_bound_issuer(
    cluster: FakeCluster, proxy_token: Path, tmp_path: Path
) -> None:
    ticks = Ticks()
    verifier = jwks_verifier(cluster, proxy_token, ticks)
    with app_client(tmp_path, Clock(NOW), verifier=verifier) as client:
        issuer = setup_issuer(client)
        results = []
        for kid in ("rsa-1", "ec-1"):  # RS256 and ES256
            token = cluster.token("payments", "keybrake-issuer", kid=kid)
            results.append(client.post("/vault/keys", json=KEY, headers=bearer(token)))
        other_ns = client.post(
            "/vault/keys",
            json={**KEY, "namespace": "growth"},
            headers=bearer(cluster.token("payments", "keybrake-issuer")),
        )
        events = client.get("/vault/events", params={"action": "key.issue"}).json()["data"]
    assert [r.status_code for r in results] == [201, 201]
    key = results[0].json()
    assert (key["issuer_id"], key["namespace"], key["service_account"]) == (
        issuer["issuer_id"],
        "payments",
        "keybrake-issuer",
    )
    # The namespace comes from the token, never from the body.
    assert other_ns.status_code == 403 and other_ns.json()["error"]["code"] == "namespace"
    assert (
        events[-1]["actor"]
        == f"payments/keybrake-issuer via issuer {issuer['issuer_id']} (payments)"
    )
    assert verifier.fetches == 1  # the keys were fetched once, with the proxy's own token
    fetchers = {r.user for r in cluster.requests if r.path.startswith(("/openid", "/.well-known"))}
    assert fetchers == {"system:serviceaccount:keybrake:keybrake"}


def _none_token(cluster: FakeCluster) -> str:
    good = jwt.decode(
        cluster.token("payments", "keybrake-issuer"), options={"verify_signature": False}
    )
    return jwt.encode(good, None, algorithm="none")


def _hmac_with_public_key(cluster: FakeCluster) -> str:
    """The classic confusion: HS256 'signed' with the RSA public key as the HMAC secret."""
    from cryptography.hazmat.primitives import serialization

    public = (
        cluster.keys[0]
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    claims = jwt.decode(
        cluster.token("payments", "keybrake-issuer"), options={"verify_signature": False}
    )
    header = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


BAD_TOKENS = {
    "wrong audience": lambda c: c.token("payments", "keybrake-issuer", audience="vault"),
    "expired": lambda c: c.token(
        "payments", "keybrake-issuer", issued_at=time.time() - 3600, lifetime=600
    ),
    "not yet valid": lambda c: c.token(
        "payments", "keybrake-issuer", not_before=time.time() + 600, lifetime=1200
    ),
    "alg none": _none_token,
    "HS256 with the public key": _hmac_with_public_key,
    "another issuer": lambda c: c.token("payments", "keybrake-issuer", issuer="https://evil.test"),
    "namespace not bound": lambda c: c.token("growth", "keybrake-issuer"),
    "service account not bound": lambda c: c.token("payments", "default"),
    "garbage": lambda c: "eyJ" + "x" * 40 + ".e30.sig",
}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inproc.db'}"
    return str(request.getfixturevalue("pg_fresh_url"))


def stored_events(database_url: str) -> str:
    """Every events row as the database holds it (not as the store reads it back)."""
    if database_url.startswith("sqlite:///"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db:
            return repr(db.execute("SELECT * FROM events").fetchall())

    async def dump() -> str:
        import asyncpg

        conn = await asyncpg.connect(database_url)
        try:
            return repr([tuple(r) for r in await conn.fetch("SELECT * FROM events")])
        finally:
            await conn.close()

    return asyncio.run(dump())


SMUGGLED = {
    "vault key": "kbv_" + "SmuggledVaultKey0123456789",
    "issuer token": "kbi_" + "SmuggledIssuerToken0123456789",
    "jwt": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzbXVnZ2xlZCJ9.c2lnbmF0dXJlc211Z2dsZWQ",
}


@pytest.mark.parametrize("what", sorted(SMUGGLED))
def test_a_refused_tokens_claimed_subject_is_recorded_redacted(
    what: str, cluster: FakeCluster, proxy_token: Path, tmp_path: Path, database_url: str
) -> None:
    """The subject of a token that is refused is unverified: whatever the caller put there is
    recorded as the actor, redacted like any audit row."""
    secret = SMUGGLED[what]
    claims = jwt.decode(
        cluster.token("payments", "keybrake-issuer"), options={"verify_signature": False}
    )
    claims["sub"] = f"system:serviceaccount:payments:{secret}"
    token = jwt.encode(claims, None, algorithm="none")  # refused: not signed
    verifier = jwks_verifier(cluster, proxy_token, Ticks())
    with app_client(tmp_path, Clock(NOW), verifier=verifier, database_url=database_url) as client:
        setup_issuer(client)
        api = client.post("/vault/keys", json=KEY, headers=bearer(token))
        refused = client.get("/vault/events", params={"action": "login.refused"}).json()["data"]
    stored = stored_events(database_url)
    assert api.status_code == 401
    assert len(refused) == 1
    assert refused[0]["actor"].startswith("unverified system:serviceaccount:payments:")
    assert secret not in refused[0]["actor"]
    assert "login.refused" in stored
    assert secret not in stored and "SmuggledIssuer" not in stored and "SmuggledVault" not in stored
    assert "redacted" in stored


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_a_bad_token_is_refused_with_an_event(
    case: str, cluster: FakeCluster, proxy_token: Path, tmp_path: Path
) -> None:
    verifier = jwks_verifier(cluster, proxy_token, Ticks())
    with app_client(tmp_path, Clock(NOW), verifier=verifier) as client:
        setup_issuer(client)
        token = BAD_TOKENS[case](cluster)
        response = client.post("/vault/keys", json=KEY, headers=bearer(token))
        listed = client.get("/vault/keys").json()["data"]
        refused = client.get("/vault/events", params={"action": "login.refused"}).json()["data"]
    assert response.status_code == 401, response.text
    assert listed == []
    assert len(refused) == 1 and refused[0]["outcome"].startswith("refused: ")
    assert token not in str(refused) and token not in response.text


def test_an_unknown_key_id_is_fetched_again_once_then_refused(
    cluster: FakeCluster, proxy_token: Path, tmp_path: Path
) -> None:
    ticks = Ticks()
    verifier = jwks_verifier(cluster, proxy_token, ticks)
    with app_client(tmp_path, Clock(NOW), verifier=verifier) as client:
        setup_issuer(client)
        ok = client.get("/vault/keys", headers=bearer(cluster.token("payments", "keybrake-issuer")))
        assert ok.status_code == 200 and verifier.fetches == 1
        # A key id the cluster never had: within REFETCH_AFTER, no second fetch.
        stranger = cluster.token("payments", "keybrake-issuer")
        forged = jwt.encode(
            jwt.decode(stranger, options={"verify_signature": False}),
            cluster.keys[0].private,
            algorithm="RS256",
            headers={"kid": "rsa-99"},
        )
        first = client.get("/vault/keys", headers=bearer(forged))
        assert first.status_code == 401 and verifier.fetches == 1
        ticks.now += REFETCH_AFTER
        second = client.get("/vault/keys", headers=bearer(forged))
        assert second.status_code == 401 and verifier.fetches == 2  # fetched once more, in vain
        third = client.get("/vault/keys", headers=bearer(forged))
        assert third.status_code == 401 and verifier.fetches == 2
        # The cluster rotates its keys: a token with the new key id is accepted after one fetch.
        kid = cluster.rotate()
        ticks.now += REFETCH_AFTER
        rotated = client.get(
            "/vault/keys", headers=bearer(cluster.token("payments", "keybrake-issuer", kid=kid))
        )
    assert rotated.status_code == 200 and verifier.fetches == 3
    assert "signing key" in first.json()["error"]["message"]


def test_keys_come_from_a_jwks_file_or_the_discovery_needs_the_proxys_token(
    cluster: FakeCluster, tmp_path: Path
) -> None:
    import json

    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [k.jwk() for k in cluster.keys]}))
    from_file = JwksVerifier(issuer=cluster.issuer, jwks_file=jwks)
    anonymous = JwksVerifier(
        issuer=cluster.issuer, api=ApiServer(cluster.url, cluster.ca_file, token_file=None)
    )
    token = cluster.token("payments", "keybrake-issuer")
    for verifier, expected in ((from_file, 200), (anonymous, 401)):
        folder = tmp_path / str(expected)
        folder.mkdir()
        with app_client(folder, Clock(NOW), verifier=verifier) as client:
            setup_issuer(client)
            response = client.get("/vault/keys", headers=bearer(token))
        assert response.status_code == expected, response.text
    assert "cannot load the cluster's signing keys" in response.json()["error"]["message"]


def test_tokenreview_mode_asks_the_api_server_and_refuses_a_deleted_pods_token(
    cluster: FakeCluster, proxy_token: Path, tmp_path: Path
) -> None:
    with app_client(
        tmp_path,
        Clock(NOW),
        kubernetes_auth="tokenreview",
        kubernetes_api_url=cluster.url,
        kubernetes_ca_file=cluster.ca_file,
        kubernetes_token_file=proxy_token,
    ) as client:
        setup_issuer(client)
        live = cluster.token("payments", "keybrake-issuer", pod="issue-pod-1")
        gone = cluster.token("payments", "keybrake-issuer", pod="issue-pod-2")
        cluster.deleted_pods.add("issue-pod-2")
        accepted = client.post("/vault/keys", json=KEY, headers=bearer(live))
        refused = client.post("/vault/keys", json=KEY, headers=bearer(gone))
        wrong_audience = client.get(
            "/vault/keys",
            headers=bearer(cluster.token("payments", "keybrake-issuer", audience="x")),
        )
    assert accepted.status_code == 201 and accepted.json()["namespace"] == "payments"
    assert refused.status_code == wrong_audience.status_code == 401
    assert "API server refused" in refused.json()["error"]["message"]
    reviews = [r for r in cluster.requests if r.path.endswith("/tokenreviews")]
    assert len(reviews) == 3 and {r.user for r in reviews} == {
        "system:serviceaccount:keybrake:keybrake"
    }


def test_jwks_mode_without_an_issuer_is_a_clear_start_up_error(tmp_path: Path) -> None:
    from keybrake.proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="KEYBRAKE_KUBERNETES_ISSUER"):
        with app_client(tmp_path, kubernetes_auth="jwks"):
            pass


def test_jwks_mode_from_settings_fetches_through_the_discovery_document(
    cluster: FakeCluster, proxy_token: Path, tmp_path: Path
) -> None:
    with app_client(
        tmp_path,
        Clock(NOW),
        kubernetes_auth="jwks",
        kubernetes_issuer=cluster.issuer,
        kubernetes_api_url=cluster.url,
        kubernetes_ca_file=cluster.ca_file,
        kubernetes_token_file=proxy_token,
    ) as client:
        setup_issuer(client)
        token = cluster.token("payments", "keybrake-issuer", kid="ec-1")
        response = client.post("/vault/keys", json=KEY, headers=bearer(token))
    assert response.status_code == 201, response.text
    paths = [r.path for r in cluster.requests]
    assert paths[:2] == ["/.well-known/openid-configuration", "/openid/v1/jwks"]


def test_the_api_server_is_reached_with_the_pods_mounted_ca_and_token_unless_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounted = tmp_path / "serviceaccount"
    mounted.mkdir()
    (mounted / "ca.crt").write_text("ca")
    (mounted / "token").write_text("token")
    monkeypatch.setattr(kubernetes, "IN_CLUSTER", mounted)
    in_pod = ApiServer.from_settings(Settings(kubernetes_auth="tokenreview"))
    assert in_pod == ApiServer(
        "https://kubernetes.default.svc", mounted / "ca.crt", mounted / "token"
    )
    chosen = Settings(
        kubernetes_api_url="https://10.0.0.1:6443",
        kubernetes_ca_file=tmp_path / "cluster-ca.crt",
        kubernetes_token_file=tmp_path / "proxy-token",
    )
    assert ApiServer.from_settings(chosen) == ApiServer(
        "https://10.0.0.1:6443", tmp_path / "cluster-ca.crt", tmp_path / "proxy-token"
    )
    monkeypatch.setattr(kubernetes, "IN_CLUSTER", tmp_path / "not-in-a-pod")
    assert ApiServer.from_settings(Settings()) == ApiServer()  # the system's CA, no token
