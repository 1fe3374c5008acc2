"""A Stripe-shaped upstream for what localstripe does not do: `Request-Id` headers, slow,
failing and dropped answers, idempotency keys, and recording what reached it.

Behaviour follows Stripe's documented API: form-encoded bodies, JSON objects with `id`, errors
`{"error": {...}}`, a `Request-Id` header on every response. Idempotency as Stripe documents it
(https://docs.stripe.com/api/idempotent_requests): a POST's result is stored once execution
starts, whatever it is; the same key with the same parameters gets that result again, marked
`Idempotent-Replayed: true`; with other parameters an `idempotency_error` (400); while the first
request is still executing, a conflict (409). Keys belong to the account the request acts on.
"""

from __future__ import annotations

import itertools
import json
import ssl
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from tests.fakes.server import GatedServer


class FakeStripe(GatedServer):
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """With `ssl_context`, it serves HTTPS (as api.stripe.com does)."""
        self.requests: list[dict[str, Any]] = []
        self.mode = "ok"  # ok | hang | drop | error500 | decline
        self.objects: dict[str, dict[str, Any]] = {}
        # (account, idempotency key) -> (request fingerprint, stored result or None while running)
        self.idempotent: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._ids = itertools.count(1)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        super().__init__(app, ssl_context)
        self.unhang = self.event(is_set=False)  # "hang" mode waits for it after the gate

    def release(self) -> None:
        super().release()
        self.call(self.unhang.set)

    def add_object(self, obj: dict[str, Any]) -> None:
        self.objects[obj["id"]] = obj

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r["method"] == method and r["path"] == path)

    def created(self) -> list[dict[str, Any]]:
        """The objects POSTs created (replays create none)."""
        return [o for o in self.objects.values() if o.get("request") is not None]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        form = {
            k: v[-1]
            for k, v in parse_qs(body.decode(errors="replace"), keep_blank_values=True).items()
        }
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "form": form,
                "body": body,
            }
        )
        request_id = f"req_fake{next(self._ids):06d}"
        key = request.headers.get("Idempotency-Key")
        if request.method != "POST" or key is None:
            return await self._execute(request, form, {"Request-Id": request_id})
        slot = (request.headers.get("Stripe-Account", ""), key)
        fingerprint = (request.path, body)
        if slot in self.idempotent:
            first, result = self.idempotent[slot]
            if first != fingerprint:
                return web.json_response(
                    {
                        "error": {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only be used with the "
                            "same parameters they were first used with.",
                        }
                    },
                    status=400,
                    headers={"Request-Id": request_id},
                )
            if result is None:
                return web.json_response(
                    {
                        "error": {
                            "type": "idempotency_error",
                            "message": "There is currently another in-progress request using "
                            "this Stripe token (probably the same idempotency key).",
                        }
                    },
                    status=409,
                    headers={"Request-Id": request_id},
                )
            status, payload = result
            replayed = {"Request-Id": request_id, "Idempotent-Replayed": "true"}
            return web.json_response(payload, status=status, headers=replayed)
        self.idempotent[slot] = (fingerprint, None)
        response = await self._execute(request, form, {"Request-Id": request_id})
        if response.content_type == "application/json":
            stored = json.loads(bytes(response.body))  # type: ignore[arg-type]
            self.idempotent[slot] = (fingerprint, (response.status, stored))
        return response

    async def _execute(
        self, request: web.Request, form: dict[str, str], headers: dict[str, str]
    ) -> web.Response:
        await self.at_gate()
        if self.mode == "hang":
            await self.unhang.wait()
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.abort()
            raise web.HTTPInternalServerError()
        if self.mode == "huge":
            return web.Response(body=b"x" * (17 * 1024 * 1024), headers=headers)
        if self.mode == "ratelimit":
            payload = {"error": {"type": "invalid_request_error", "code": "rate_limit"}}
            headers["X-Keybrake-Cap-Hit"] = "true"  # a vendor must not be able to fake one
            return web.json_response(payload, status=429, headers=headers)
        if self.mode == "error500":
            payload = {"error": {"type": "api_error", "message": "internal"}}
            return web.json_response(payload, status=500, headers=headers)
        if request.method == "GET":
            object_id = request.path.rstrip("/").split("/")[-1]
            if object_id in self.objects:
                return web.json_response(self.objects[object_id], headers=headers)
            payload = {"error": {"type": "invalid_request_error", "message": "No such object"}}
            return web.json_response(payload, status=404, headers=headers)
        if self.mode == "decline":
            payload = {
                "error": {"type": "card_error", "code": "card_declined", "message": "declined"}
            }
            return web.json_response(payload, status=402, headers=headers)
        prefix = {"payment_intents": "pi", "refunds": "re", "charges": "ch"}.get(
            request.path.split("/")[2] if request.path.count("/") >= 2 else "", "obj"
        )
        obj: dict[str, Any] = {"id": f"{prefix}_fake{next(self._ids)}", "object": prefix}
        if "amount" in form:
            obj["amount"] = int(form["amount"])
        if "currency" in form:
            obj["currency"] = form["currency"]
        obj["request"] = json.dumps(form)
        self.objects[obj["id"]] = obj
        return web.json_response(obj, headers=headers)
