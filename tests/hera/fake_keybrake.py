"""A stand-in for the keybrake proxy's admin API, for running the step scripts without the real
proxy: it answers the documented contract (POST/GET/DELETE /vault/keys, POST /vault/keys/revoke,
POST/DELETE /vault/budgets) and records every request. `script` queues canned answers (status,
body) for the next requests."""

from __future__ import annotations

import itertools
import json
import ssl
import threading
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ADMIN_TOKEN = "kb_admin_test_token"


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str
    body: Any
    idempotency_key: str | None = None


@dataclass
class FakeKeybrake:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)
    script: list[tuple[int, Any]] = field(default_factory=list)
    # Which Bearer tokens it takes: the test's issuer token, or what `accept` says (e.g. a
    # projected service-account token the fake cluster signed).
    accept: Any = None
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def accepts(self, token: str) -> bool:
        return token == ADMIN_TOKEN or (self.accept is not None and bool(self.accept(token)))

    def key_info(self, key_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.keys[key_id].items() if k != "vault_key"}

    def handle(
        self,
        method: str,
        path: str,
        authorization: str,
        body: Any,
        idempotency_key: str | None = None,
    ) -> tuple[int, Any]:
        self.requests.append(Recorded(method, path, authorization, body, idempotency_key))
        if self.script:
            return self.script.pop(0)
        if not self.accepts(authorization.removeprefix("Bearer ")):
            return 401, {"error": {"type": "unauthorized", "message": "bad admin token"}}
        if method == "POST" and path == "/vault/keys":
            if not isinstance(body, dict) or body.get("vendor") not in ("stripe", "resend"):
                return 400, {"error": {"type": "invalid_request", "message": "unknown vendor"}}
            key_id = f"vk_{next(self._ids)}"
            self.keys[key_id] = {
                "key_id": key_id,
                "vault_key": f"kbv_secret_{key_id}",
                "vendor": body["vendor"],
                **_caps(body, "daily_usd_cap", "total_usd_cap", "max_usd_per_caller"),
                "budget_id": body.get("budget_id"),
                "allowed_endpoints": body["allowed_endpoints"],
                "expires_at": "2030-01-01T02:00:00Z",
                "agent_run_label": body["agent_run_label"],
                "constraints": body.get("constraints"),
                "status": "active",
                "spent_usd": "0.00",
                "calls": 0,
                "cap_hits": 0,
            }
            return 201, self.keys[key_id]
        if path.startswith("/vault/keys/") and method in ("GET", "DELETE"):
            key_id = path.rsplit("/", 1)[1]
            if key_id not in self.keys:
                return 404, {"error": {"type": "not_found", "message": f"no key {key_id}"}}
            if method == "DELETE":
                self.keys[key_id]["status"] = "revoked"
            return 200, self.key_info(key_id)
        if method == "POST" and path == "/vault/budgets":
            budget_id = f"bg_{next(self._ids)}"
            self.budgets[budget_id] = {
                "budget_id": budget_id,
                **_caps(body, "daily_usd_cap", "total_usd_cap"),
                "expires_at": "2030-01-01T06:00:00Z",
                "agent_run_label": body["agent_run_label"],
                "constraints": body.get("constraints"),
                "status": "active",
                "spent_usd": "0.00",
                "total_spent_usd": "0.00",
                "calls": 0,
                "cap_hits": 0,
            }
            return 201, self.budgets[budget_id]
        if path.startswith("/vault/budgets/") and method == "DELETE":
            budget_id = path.rsplit("/", 1)[1]
            if budget_id not in self.budgets:
                return 404, {"error": {"type": "not_found", "message": f"no budget {budget_id}"}}
            self.budgets[budget_id]["status"] = "revoked"
            drawing = [k for k in self.keys.values() if k["budget_id"] == budget_id]
            for key in drawing:
                key["status"] = "revoked"
            return 200, {**self.budgets[budget_id], "keys": [k["key_id"] for k in drawing]}
        if method == "POST" and path == "/vault/keys/revoke":
            label = body.get("agent_run_label")
            active = [
                k
                for k in self.keys.values()
                if k["agent_run_label"] == label and k["status"] == "active"
            ]
            for key in active:
                key["status"] = "revoked"
            budgets = [
                b
                for b in self.budgets.values()
                if b["agent_run_label"] == label and b["status"] == "active"
            ]
            for budget in budgets:
                budget["status"] = "revoked"
            keys = [self.key_info(k["key_id"]) for k in active]  # as the proxy: revoked just now
            return 200, {
                "agent_run_label": label,
                "revoked": len(active),
                "keys": keys,
                "budgets": budgets,
            }
        return 404, {"error": {"type": "not_found", "message": f"{method} {path}"}}


def _caps(body: dict[str, Any], *names: str) -> dict[str, str]:
    """The caps the request set, as the proxy answers them (two decimals)."""
    return {name: f"{Decimal(body[name]):.2f}" for name in names if body.get(name) is not None}


def serve(fake: FakeKeybrake, tls: tuple[Path, Path] | None = None) -> ThreadingHTTPServer:
    """Serve `fake` on a free loopback port; the caller shuts the server down. With `tls` (a
    certificate and its key, PEM files) it serves https."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            status, answer = fake.handle(
                self.command,
                self.path,
                self.headers.get("Authorization", ""),
                body,
                self.headers.get("Idempotency-Key"),
            )
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        # The handshake happens as a connection is accepted: one a client refuses (it does not
        # trust the certificate) ends there, and the server goes on.
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    fake.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    return server
