"""A Resend-shaped upstream: the emails endpoints, as documented.

Bearer API key (none: 401 `missing_api_key`; wrong: 403 `invalid_api_key`). `POST /emails` (a
JSON object with `from`, `to`, `subject` and `html` or `text`) answers 200 `{"id"}`;
`POST /emails/batch` (a JSON array) answers `{"data": [{"id"}, ...]}`, and with
`x-batch-validation: permissive` leaves invalid items out of `data` and lists them in `errors`.
`GET /emails/{id}` answers the email. Errors are `{"statusCode", "name", "message"}`; every
answer carries the `ratelimit-*` headers (and `retry-after` on a 429) and a Cloudflare `cf-ray`.
"""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

from aiohttp import web

from tests.fakes.server import ThreadedServer

REAL_KEY = "re_REALKEY_do_not_leak_" + "5" * 12
_REQUIRED = ("from", "to", "subject")


def _error(status: int, name: str, message: str, headers: dict[str, str]) -> web.Response:
    body = {"statusCode": status, "name": name, "message": message}
    return web.json_response(body, status=status, headers=headers)


def _invalid(email: Any) -> str | None:
    if not isinstance(email, dict):
        return "The email must be an object."
    missing = [field for field in _REQUIRED if not email.get(field)]
    if missing:
        return f"Missing `{missing[0]}` field."
    if not (email.get("html") or email.get("text") or email.get("template")):
        return "Missing `html` or `text` field."
    return None


class FakeResend(ThreadedServer):
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.emails: dict[str, dict[str, Any]] = {}
        self.mode = "ok"  # ok | ratelimit
        self._rays = itertools.count(1)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        super().__init__(app)

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r["method"] == method and r["path"] == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": raw,
            }
        )
        headers = {
            "cf-ray": f"{next(self._rays):016x}-SJC",
            "ratelimit-limit": "2",
            "ratelimit-remaining": "1",
            "ratelimit-reset": "1",
        }
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth.removeprefix("Bearer ").strip():
            return _error(
                401, "missing_api_key", "Missing API key in the authorization header.", headers
            )
        if auth != f"Bearer {REAL_KEY}":
            return _error(403, "invalid_api_key", "API key is invalid", headers)
        if self.mode == "ratelimit":
            headers.update({"ratelimit-remaining": "0", "retry-after": "1"})
            headers["X-Keybrake-Cap-Hit"] = "true"  # a vendor must not be able to fake one
            return _error(
                429,
                "rate_limit_exceeded",
                "Too many requests. You can only make 2 requests per second.",
                headers,
            )
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            return _error(400, "validation_error", "Invalid JSON body.", headers)
        if request.method == "POST" and request.path == "/emails":
            problem = _invalid(payload)
            if problem:
                return _error(422, "missing_required_field", problem, headers)
            return web.json_response({"id": self._store(payload)}, headers=headers)
        if request.method == "POST" and request.path == "/emails/batch":
            if not isinstance(payload, list) or not payload:
                return _error(422, "validation_error", "The body must be an array.", headers)
            permissive = request.headers.get("x-batch-validation", "strict") == "permissive"
            problems = [(i, _invalid(email)) for i, email in enumerate(payload)]
            errors = [{"index": i, "message": p} for i, p in problems if p]
            if errors and not permissive:
                return _error(422, "validation_error", errors[0]["message"], headers)
            data = [{"id": self._store(e)} for e, (_, p) in zip(payload, problems) if not p]
            answer: dict[str, Any] = {"data": data}
            if permissive:
                answer["errors"] = errors
            return web.json_response(answer, headers=headers)
        if request.method == "GET" and request.path.startswith("/emails/"):
            email = self.emails.get(request.path.removeprefix("/emails/"))
            if email is None:
                return _error(404, "not_found", "Email not found", headers)
            return web.json_response(email, headers=headers)
        if request.method == "POST" and request.path == "/api-keys":
            created = {"id": str(uuid.uuid4()), "token": "re_brand_new_full_access_key"}
            return web.json_response(created, status=201, headers=headers)
        return _error(404, "not_found", "The requested endpoint does not exist.", headers)

    def _store(self, email: dict[str, Any]) -> str:
        email_id = str(uuid.uuid4())
        self.emails[email_id] = {
            "object": "email",
            "id": email_id,
            "to": email["to"] if isinstance(email["to"], list) else [email["to"]],
            "from": email["from"],
            "subject": email["subject"],
            "html": email.get("html"),
            "text": email.get("text"),
            "last_event": "delivered",
        }
        return email_id
