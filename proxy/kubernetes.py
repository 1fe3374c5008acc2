"""Kubernetes service-account login: who a projected service-account token says it is.

Two ways, chosen with `KEYBRAKE_KUBERNETES_AUTH`:

- `jwks` (default when enabled): the token is a JWT the cluster signed. It is verified here
  against the cluster's public keys: from `KEYBRAKE_KUBERNETES_JWKS_FILE`, or fetched from where
  the API server's OIDC discovery document (`<api>/.well-known/openid-configuration`) says, or
  from `KEYBRAKE_KUBERNETES_JWKS_URL`, with the proxy's own service-account token and the
  cluster CA, cached, and fetched again when a token names a key id not yet seen (at most once per
  `REFETCH_AFTER`). Only RS256 and ES256 are accepted (so neither `alg: none` nor an HMAC
  "signed" with the public key can pass), then `iss`, `exp` and `nbf` (with `LEEWAY`), and the
  `kubernetes.io` namespace and service-account claims, which must agree with `sub`. A projected
  token stays valid until it expires (at least 10 minutes), even after its pod is deleted: keep
  its audience specific and its expiry short.
- `tokenreview`: the API server is asked (`TokenReview`, with the proxy's own token), which also
  refuses tokens of deleted pods, at the cost of a call per login.

Either way the audiences travel with the identity; `keybrake.proxy.access` binds it to an issuer
only for the audience the issuer names.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, InitVar, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt

from keybrake.proxy.access import Identity, LoginRefused
from keybrake.proxy.errors import ConfigError
from keybrake.proxy.settings import Settings

__all__ = [
    "LEEWAY",
    "REFETCH_AFTER",
    "ApiServer",
    "JwksVerifier",
    "TokenReviewVerifier",
    "verifier_from",
]

LEEWAY = timedelta(seconds=30)  # clock skew between the proxy and the API server
REFETCH_AFTER = 10.0  # seconds between two fetches of the keys for unknown key ids
_ALGORITHMS = ("RS256", "ES256")
IN_CLUSTER = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True, slots=True)
class ApiServer:
    """The cluster's API server as the proxy reaches it: its address, the CA its certificate
    chains to (None: the system's) and the proxy's own service-account token (None: none sent)."""

    url: str = "https://kubernetes.default.svc"
    ca_file: Path | None = None
    token_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiServer:
        """As `settings` say; in a pod, the mounted service account's CA and token unless set."""
        return cls(
            url=settings.kubernetes_api_url,
            ca_file=settings.kubernetes_ca_file or _in_cluster("ca.crt"),
            token_file=settings.kubernetes_token_file or _in_cluster("token"),
        )


class _ClusterClient:
    """HTTP to the API server: the cluster CA, and the proxy's own (rotating) token."""

    def __init__(self, server: ApiServer, transport: httpx.AsyncBaseTransport | None) -> None:
        self.url = server.url.rstrip("/")
        self.token_file = server.token_file
        verify: ssl.SSLContext | bool = True
        if server.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(server.ca_file))
        self._http = httpx.AsyncClient(timeout=10.0, verify=verify, transport=transport)

    def _headers(self) -> dict[str, str]:
        if self.token_file is None:
            return {}
        # Projected tokens are rotated by the kubelet: read it for every call.
        token = self.token_file.read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    async def get_json(self, url: str) -> Any:
        response = await self._http.get(url, headers=self._headers())
        response.raise_for_status()
        return response.json()

    async def post_json(self, url: str, body: Any) -> Any:
        response = await self._http.post(url, json=body, headers=self._headers())
        response.raise_for_status()
        return response.json()

    async def close(self) -> None:
        await self._http.aclose()


def _identity(subject: str, claims: dict[str, Any], audiences: list[str]) -> Identity:
    parts = subject.split(":")
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        raise LoginRefused("not a service-account token")
    namespace, account = parts[2], parts[3]
    kube = claims.get("kubernetes.io")
    if kube is not None:
        named = (kube.get("namespace"), (kube.get("serviceaccount") or {}).get("name"))
        if named != (namespace, account):
            raise LoginRefused("the token's kubernetes.io claims disagree with its subject")
    return Identity(namespace, account, tuple(sorted(set(audiences))))


def _claimed(token: str) -> str | None:
    """Who an unverified token claims to be, for the record of a refused login."""
    try:
        subject = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        return None
    return f"unverified {str(subject)[:200]}" if subject else None


@dataclass(eq=False)  # holds a connection: compared and hashed by identity
class JwksVerifier:
    """Verifies tokens against the cluster's signing keys (`jwks_file`, `jwks_url`, or where
    the API server's discovery document says), fetched with `api`'s CA and token."""

    _: KW_ONLY
    issuer: str
    api: ApiServer = ApiServer()
    jwks_file: Path | None = None
    jwks_url: str | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    monotonic: Callable[[], float] = time.monotonic
    transport: InitVar[httpx.AsyncBaseTransport | None] = None
    fetches: int = field(init=False, default=0)  # how many times the keys were (re)loaded
    _keys: dict[str, jwt.PyJWK] = field(init=False, default_factory=dict)
    _fetched_at: float | None = field(init=False, default=None)
    _cluster: _ClusterClient = field(init=False)

    def __post_init__(self, transport: httpx.AsyncBaseTransport | None) -> None:
        self._cluster = _ClusterClient(self.api, transport)

    async def _load(self) -> None:
        self.fetches += 1
        self._fetched_at = self.monotonic()
        if self.jwks_file is not None:
            document = json.loads(self.jwks_file.read_text())
        else:
            url = self.jwks_url
            if url is None:
                # The API server serves the discovery document at its own address, whatever
                # its issuer URL; the document names where the keys are.
                discovery = await self._cluster.get_json(
                    f"{self._cluster.url}/.well-known/openid-configuration"
                )
                if discovery.get("issuer") != self.issuer:
                    raise LoginRefused("the cluster's discovery document names another issuer")
                url = str(discovery["jwks_uri"])
            document = await self._cluster.get_json(url)
        keys: dict[str, jwt.PyJWK] = {}
        for entry in document.get("keys", []):
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key type this proxy does not use
            if key.key_id:
                keys[key.key_id] = key
        self._keys = keys

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        due = self._fetched_at is None or self.monotonic() - self._fetched_at >= REFETCH_AFTER
        if kid not in self._keys and due:
            try:
                await self._load()
            except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
                raise LoginRefused(f"cannot load the cluster's signing keys: {exc}") from exc
        return self._keys.get(kid)

    async def verify(self, token: str) -> Identity:
        claimed = _claimed(token)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise LoginRefused("malformed token", claimed) from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in _ALGORITHMS:
            raise LoginRefused(f"token algorithm {str(alg)[:20]!r} is not accepted", claimed)
        if not isinstance(kid, str):
            raise LoginRefused("the token names no signing key (kid)", claimed)
        key = await self._key(kid)
        if key is None:
            raise LoginRefused("the token's signing key is not the cluster's", claimed)
        if key.algorithm_name != alg:
            raise LoginRefused("the token's algorithm does not fit its key", claimed)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                issuer=self.issuer,
                options={
                    "require": ["iss", "sub", "aud", "exp"],
                    "verify_aud": False,  # checked against the issuer's binding
                    "verify_exp": False,  # checked below, against the injectable clock
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidIssuerError as exc:
            raise LoginRefused("the token is from another issuer", claimed) from exc
        except jwt.PyJWTError as exc:
            raise LoginRefused(f"invalid token: {exc}", claimed) from exc
        now = self.clock().timestamp()
        leeway = LEEWAY.total_seconds()
        if not isinstance(claims.get("exp"), int | float) or now > claims["exp"] + leeway:
            raise LoginRefused("the token has expired", claimed)
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int | float) or now < nbf - leeway):
            raise LoginRefused("the token is not valid yet", claimed)
        audience = claims["aud"]
        audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise LoginRefused("the token's audience is malformed", claimed)
        try:
            return _identity(str(claims["sub"]), claims, audiences)
        except LoginRefused as exc:
            raise LoginRefused(exc.message, claimed) from None

    async def close(self) -> None:
        await self._cluster.close()


class TokenReviewVerifier:
    """Asks the API server (`POST /apis/authentication.k8s.io/v1/tokenreviews`)."""

    def __init__(
        self,
        *,
        api: ApiServer,
        audiences: Callable[[], list[str]] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.audiences = audiences
        self._cluster = _ClusterClient(api, transport)

    async def verify(self, token: str) -> Identity:
        claimed = _claimed(token)
        spec: dict[str, Any] = {"token": token}
        if self.audiences is not None:
            spec["audiences"] = self.audiences()
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            answer = await self._cluster.post_json(
                f"{self._cluster.url}/apis/authentication.k8s.io/v1/tokenreviews", review
            )
        except (httpx.HTTPError, OSError, ValueError) as exc:
            raise LoginRefused(
                f"the API server could not review the token: {exc}", claimed
            ) from exc
        status = answer.get("status") or {}
        if not status.get("authenticated"):
            reason = str(status.get("error") or "not authenticated")[:200]
            raise LoginRefused(f"the API server refused the token: {reason}", claimed)
        user = status.get("user") or {}
        return _identity(str(user.get("username", "")), {}, list(status.get("audiences") or []))

    async def close(self) -> None:
        await self._cluster.close()


def verifier_from(
    settings: Settings, audiences: Callable[[], list[str]] | None = None
) -> JwksVerifier | TokenReviewVerifier | None:
    """The verifier `settings` asks for (None: Kubernetes login is off)."""
    mode = settings.kubernetes_auth
    if mode == "off":
        return None
    api = ApiServer.from_settings(settings)
    if mode == "tokenreview":
        return TokenReviewVerifier(api=api, audiences=audiences)
    if not settings.kubernetes_issuer:
        raise ConfigError(
            "KEYBRAKE_KUBERNETES_AUTH=jwks needs KEYBRAKE_KUBERNETES_ISSUER (the `iss` of the "
            "cluster's service-account tokens; `kubectl get --raw "
            "/.well-known/openid-configuration` shows it)"
        )
    return JwksVerifier(
        issuer=settings.kubernetes_issuer,
        api=api,
        jwks_file=settings.kubernetes_jwks_file,
        jwks_url=settings.kubernetes_jwks_url,
    )


def _in_cluster(name: str) -> Path | None:
    path = IN_CLUSTER / name
    return path if path.exists() else None
