"""A stand-in for the slice of the Kubernetes API server keybrake talks to, written to the
documented behaviour (there is no cluster here):

- service-account tokens: JWTs it signs with keys made in the test (RSA and EC), with the claims
  the API server puts in projected tokens (`iss`, `sub` = system:serviceaccount:NS:NAME, `aud`,
  `exp`, `iat`, `nbf`, and `kubernetes.io` with namespace, service account and pod);
- OIDC discovery (`/.well-known/openid-configuration`) and the JWKS (`/openid/v1/jwks`), which,
  like a default cluster, need an authenticated caller;
- `TokenReview` (`POST /apis/authentication.k8s.io/v1/tokenreviews`), which also refuses the
  token of a deleted pod;
- Secrets: create, get, delete (`/api/v1/namespaces/NS/secrets[/NAME]`), `stringData` turned
  into base64 `data`, `ownerReferences` kept, `409 AlreadyExists` and `403 Forbidden` as
  `Status` objects, each request authorised by a small RBAC table (namespace, service account)
  → verbs.

It serves HTTPS with a CA made in the test, as an API server does.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.fakes.pki import CertificateAuthority
from tests.fakes.server import ThreadedServer

ISSUER = "https://kubernetes.default.svc.cluster.local"
API_AUDIENCE = ISSUER  # what a token without a requested audience is for
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    """A failure as the API server reports it: a `Status` object."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class _SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        public = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}


@dataclass
class Request:
    method: str
    path: str
    user: str | None


@dataclass
class FakeCluster:
    folder: Path
    issuer: str = ISSUER
    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    configmaps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    rbac: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    deleted_pods: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ca = CertificateAuthority(self.folder / "cluster-pki", "fake cluster CA")
        serving = self.ca.server_cert("apiserver")
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(serving.cert_file, serving.key_file)
        self._lock = threading.Lock()
        self.keys = [
            _SigningKey("rsa-1", "RS256", rsa.generate_private_key(65537, 2048)),
            _SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1())),
        ]
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/openid/v1/jwks", self._jwks)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._review)
        app.router.add_post("/api/v1/namespaces/{ns}/secrets", self._create_secret)
        app.router.add_get("/api/v1/namespaces/{ns}/secrets/{name}", self._get_secret)
        app.router.add_delete("/api/v1/namespaces/{ns}/secrets/{name}", self._delete_secret)
        self.server = ThreadedServer(app, context)
        self.url = self.server.url
        self.ca_file = self.ca.ca_file

    # -- what a test does with it ----------------------------------------------------------

    def token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str | list[str] = "keybrake",
        lifetime: int = 600,
        kid: str = "rsa-1",
        issuer: str | None = None,
        not_before: float | None = None,
        pod: str | None = None,
        issued_at: float | None = None,
    ) -> str:
        """A projected service-account token, as the kubelet would mount it."""
        key = next(k for k in self.keys if k.kid == kid)
        now = time.time() if issued_at is None else issued_at
        pod = pod or f"pod-{uuid.uuid4().hex[:8]}"
        claims = {
            "iss": issuer or self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": audience if isinstance(audience, list) else [audience],
            "iat": int(now),
            "nbf": int(now if not_before is None else not_before),
            "exp": int(now + lifetime),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
                "pod": {"name": pod, "uid": str(uuid.uuid4())},
            },
        }
        return jwt.encode(claims, key.private, algorithm=key.alg, headers={"kid": kid})

    def proxy_login_settings(self, folder: Path) -> dict[str, str]:
        """The proxy's settings for service-account login against this cluster (JWKS mode), with
        the proxy's own service-account token to read the cluster's keys."""
        folder.mkdir(parents=True, exist_ok=True)
        token = folder / "proxy-sa-token"
        token.write_text(self.token("keybrake", "keybrake", audience=self.issuer, lifetime=86400))
        return {
            "KEYBRAKE_KUBERNETES_AUTH": "jwks",
            "KEYBRAKE_KUBERNETES_ISSUER": self.issuer,
            "KEYBRAKE_KUBERNETES_API_URL": self.url,
            "KEYBRAKE_KUBERNETES_CA_FILE": str(self.ca_file),
            "KEYBRAKE_KUBERNETES_TOKEN_FILE": str(token),
        }

    def rotate(self) -> str:
        """Add a signing key (as a cluster rotating its keys does); returns its key id."""
        kid = f"rsa-{len(self.keys) + 1}"
        self.keys.append(_SigningKey(kid, "RS256", rsa.generate_private_key(65537, 2048)))
        return kid

    def allow(self, namespace: str, service_account: str, *verbs: str) -> None:
        self.rbac.setdefault((namespace, service_account), set()).update(verbs)

    def accepts(self, token: str, audience: str = "keybrake") -> bool:
        """Whether `token` is one of this cluster's valid tokens for `audience` (for stand-ins
        of the proxy, which verify it as keybrake does)."""
        return self._verify(token, [audience]) is not None

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        secret = self.secrets[(namespace, name)]
        return base64.b64decode(secret["data"][key]).decode()

    def stop(self) -> None:
        self.server.stop()

    # -- authentication, as the API server does it ------------------------------------------

    def _verify(self, token: str, audiences: Iterable[str]) -> dict[str, Any] | None:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = next(k for k in self.keys if k.kid == kid)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.private.public_key(),
                algorithms=[key.alg],
                issuer=self.issuer,
                options={"verify_aud": False},
            )
        except (jwt.PyJWTError, StopIteration):
            return None
        if not set(claims["aud"]) & set(audiences):
            return None
        if claims["kubernetes.io"]["pod"]["name"] in self.deleted_pods:
            return None
        return claims

    def _user(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        claims = self._verify(token, [API_AUDIENCE]) if scheme == "Bearer" else None
        user = None if claims is None else str(claims["sub"])
        with self._lock:
            self.requests.append(Request(request.method, request.path, user))
        return user

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        return web.json_response(status_object(code, reason, message), status=code)

    def _authorised(self, request: web.Request, verb: str) -> web.Response | None:
        user = self._user(request)
        if user is None:
            return self._status(401, "Unauthorized", "Unauthorized")
        namespace = request.match_info["ns"]
        _, _, ns, account = user.split(":")
        if verb not in self.rbac.get((ns, account), set()) or ns != namespace:
            return self._status(
                403,
                "Forbidden",
                f'secrets is forbidden: User "{user}" cannot {verb} resource "secrets" in API '
                f'group "" in the namespace "{namespace}"',
            )
        return None

    # -- routes ------------------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        if self._user(request) is None:
            return self._status(401, "Unauthorized", "Unauthorized")
        return web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": f"{self.url}/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": sorted({k.alg for k in self.keys}),
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        if self._user(request) is None:
            return self._status(401, "Unauthorized", "Unauthorized")
        return web.json_response({"keys": [k.jwk() for k in self.keys]})

    async def _review(self, request: web.Request) -> web.Response:
        if self._user(request) is None:
            return self._status(401, "Unauthorized", "Unauthorized")
        review = await request.json()
        spec = review["spec"]
        audiences = spec.get("audiences") or [API_AUDIENCE]
        claims = self._verify(spec["token"], audiences)
        status: dict[str, Any] = {"authenticated": False}
        if claims is not None:
            status = {
                "authenticated": True,
                "user": {"username": claims["sub"], "groups": ["system:serviceaccounts"]},
                "audiences": sorted(set(claims["aud"]) & set(audiences)),
            }
        else:
            status["error"] = "invalid bearer token"
        return web.json_response({**review, "status": status}, status=201)

    async def _create_secret(self, request: web.Request) -> web.Response:
        refused = self._authorised(request, "create")
        if refused is not None:
            return refused
        namespace = request.match_info["ns"]
        body = await request.json()
        metadata = body.get("metadata") or {}
        name = metadata.get("name", "")
        if body.get("kind") != "Secret" or not _NAME.match(name):
            return self._status(422, "Invalid", f'Secret "{name}" is invalid: metadata.name')
        data = dict(body.get("data") or {})
        for key, value in (body.get("stringData") or {}).items():
            data[key] = base64.b64encode(value.encode()).decode()
        with self._lock:
            if (namespace, name) in self.secrets:
                return self._status(409, "AlreadyExists", f'secrets "{name}" already exists')
            stored = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": body.get("type", "Opaque"),
                "metadata": {
                    **metadata,
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": str(len(self.secrets) + 1),
                },
                "data": data,
            }
            self.secrets[(namespace, name)] = stored
        return web.json_response(stored, status=201)

    async def _get_secret(self, request: web.Request) -> web.Response:
        refused = self._authorised(request, "get")
        if refused is not None:
            return refused
        found = self.secrets.get((request.match_info["ns"], request.match_info["name"]))
        if found is None:
            return self._status(
                404, "NotFound", f'secrets "{request.match_info["name"]}" not found'
            )
        return web.json_response(found)

    async def _delete_secret(self, request: web.Request) -> web.Response:
        refused = self._authorised(request, "delete")
        if refused is not None:
            return refused
        with self._lock:
            gone = self.secrets.pop((request.match_info["ns"], request.match_info["name"]), None)
        if gone is None:
            return self._status(
                404, "NotFound", f'secrets "{request.match_info["name"]}" not found'
            )
        return web.json_response({"kind": "Status", "status": "Success"})
