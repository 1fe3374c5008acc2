"""A Resend-shaped upstream: the emails endpoints, as documented, billing as Resend bills.

Bearer API key (none: 401 `missing_api_key`; wrong: 403 `invalid_api_key`). `POST /emails` (a
JSON object with `from`, `to`, `subject` and `html` or `text`) answers 200 `{"id"}`;
`POST /emails/batch` (a JSON array of at most 100 such objects) answers
`{"data": [{"id"}, ...]}`, and with `x-batch-validation: permissive` leaves invalid items out of
`data` and lists them by index in `errors`. `GET /emails/{id}` answers the email. Errors are
`{"statusCode", "name", "message"}`; every answer carries the `ratelimit-*` headers (and
`retry-after` on a 429) and a Cloudflare `cf-ray`.

Recipients, as Resend's API reference has them: `to` (required), `cc` and `bcc` are each an
address or a list of addresses, at most 50 in `to`
(https://resend.com/docs/api-reference/emails/send-email); anything else is a 422. Billing, as
Resend's quota documentation has it: every `to`, `cc` and `bcc` recipient of a sent email counts
as one email (https://resend.com/docs/knowledge-base/account-quotas-and-limits). `billed` is that
count over every email sent; each recorded request carries the credential it came with and what
it was billed.

The behaviour lives in `ResendBehaviour`. `FakeResend` serves it on a loopback port (for a real
`keybrake serve`); `InprocResend` is the same vendor behind the `upstream=` seam of `build_app`
(tests/inproc.py), with no socket at all.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from keybrake.proxy.upstream import HOP_BY_HOP, OWN_HEADERS, UpstreamResponse
from tests.fakes.inprocess import InProcessUpstream
from tests.fakes.server import ThreadedServer

REAL_KEY = "re_REALKEY_do_not_leak_" + "5" * 12
MAX_TO = 50  # addresses in `to`, per email
MAX_BATCH = 100  # emails per POST /emails/batch
_REQUIRED = ("from", "to", "subject")

Answer = tuple[int, dict[str, str], bytes]


def _json(status: int, body: Any, headers: Mapping[str, str]) -> Answer:
    return status, {"content-type": "application/json", **headers}, json.dumps(body).encode()


def _error(status: int, name: str, message: str, headers: Mapping[str, str]) -> Answer:
    return _json(status, {"statusCode": status, "name": name, "message": message}, headers)


def _addresses(value: Any, field: str) -> list[str] | str:
    """The addresses of a recipient field as Resend reads it, or what is wrong with it."""
    if value is None and field != "to":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    return f"The `{field}` field must be a `string` or an array of strings."


def _recipients(email: dict[str, Any]) -> int | str:
    """How many emails Resend bills for this one: its to, cc and bcc recipients."""
    total = 0
    for field in ("to", "cc", "bcc"):
        found = _addresses(email.get(field), field)
        if isinstance(found, str):
            return found
        if field == "to" and not found:
            return "Missing `to` field."
        if field == "to" and len(found) > MAX_TO:
            return f"Too many recipients in `to`: at most {MAX_TO} are allowed."
        total += len(found)
    return total


def _invalid(email: Any) -> str | None:
    if not isinstance(email, dict):
        return "The email must be an object."
    missing = [field for field in _REQUIRED if not email.get(field)]
    if missing:
        return f"Missing `{missing[0]}` field."
    counted = _recipients(email)
    if isinstance(counted, str):
        return counted
    if not (email.get("html") or email.get("text") or email.get("template")):
        return "Missing `html` or `text` field."
    return None


class ResendBehaviour:
    """Resend's documented behaviour and billing, with no transport of its own."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.emails: dict[str, dict[str, Any]] = {}
        self.mode = "ok"  # ok | ratelimit
        self.billed = 0  # emails billed: one per to/cc/bcc recipient of every email sent
        self._rays = itertools.count(1)

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r["method"] == method and r["path"] == path)

    def billed_to(self, credential: str) -> int:
        """Emails billed to the account of this API key."""
        return sum(r["billed"] for r in self.requests if r["credential"] == credential)

    def answer(self, method: str, path: str, headers: Mapping[str, str], raw: bytes) -> Answer:
        """Resend's answer to one request (header names lower case)."""
        auth = headers.get("authorization", "")
        credential = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        record: dict[str, Any] = {
            "method": method,
            "path": path,
            "headers": dict(headers),
            "body": raw,
            "credential": credential,
            "billed": 0,
        }
        self.requests.append(record)
        status, out, body = self._answer(method, path, headers, raw, credential)
        if status == 200 and method == "POST" and path in ("/emails", "/emails/batch"):
            record["billed"] = self._bill(path, raw, body)
            self.billed += record["billed"]
        return status, out, body

    def _bill(self, path: str, raw: bytes, body: bytes) -> int:
        sent = json.loads(raw)
        if path == "/emails":
            return int(_recipients(sent))
        failed = {error["index"] for error in json.loads(body).get("errors", [])}
        return sum(int(_recipients(e)) for i, e in enumerate(sent) if i not in failed)

    def _answer(
        self,
        method: str,
        path: str,
        request_headers: Mapping[str, str],
        raw: bytes,
        credential: str | None,
    ) -> Answer:
        headers = {
            "cf-ray": f"{next(self._rays):016x}-SJC",
            "ratelimit-limit": "2",
            "ratelimit-remaining": "1",
            "ratelimit-reset": "1",
        }
        if not credential:
            return _error(
                401, "missing_api_key", "Missing API key in the authorization header.", headers
            )
        if credential != REAL_KEY:
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
        if method == "POST" and path == "/emails":
            problem = _invalid(payload)
            if problem:
                return _error(422, "validation_error", problem, headers)
            return _json(200, {"id": self._store(payload)}, headers)
        if method == "POST" and path == "/emails/batch":
            if not isinstance(payload, list) or not payload:
                return _error(422, "validation_error", "The body must be an array.", headers)
            if len(payload) > MAX_BATCH:
                message = f"Too many emails in the batch: at most {MAX_BATCH} are allowed."
                return _error(422, "validation_error", message, headers)
            permissive = request_headers.get("x-batch-validation", "strict") == "permissive"
            problems = [(i, _invalid(email)) for i, email in enumerate(payload)]
            errors: list[dict[str, Any]] = [{"index": i, "message": p} for i, p in problems if p]
            if errors and not permissive:
                return _error(422, "validation_error", errors[0]["message"], headers)
            data = [{"id": self._store(e)} for e, (_, p) in zip(payload, problems) if not p]
            answer: dict[str, Any] = {"data": data}
            if permissive:
                answer["errors"] = errors
            return _json(200, answer, headers)
        if method == "GET" and path.startswith("/emails/"):
            email = self.emails.get(path.removeprefix("/emails/"))
            if email is None:
                return _error(404, "not_found", "Email not found", headers)
            return _json(200, email, headers)
        if method == "POST" and path == "/api-keys":
            created = {"id": str(uuid.uuid4()), "token": "re_brand_new_full_access_key"}
            return _json(201, created, headers)
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


class FakeResend(ResendBehaviour, ThreadedServer):
    """Resend on a loopback port."""

    def __init__(self) -> None:
        ResendBehaviour.__init__(self)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        ThreadedServer.__init__(self, app)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, out, body = self.answer(request.method, request.path, headers, await request.read())
        return web.Response(status=status, headers=out, body=body)


class InprocResend(ResendBehaviour, InProcessUpstream):
    """Resend behind `build_app(upstream=...)`: what the proxy sends is answered in-process, and
    what comes back is filtered the way `Upstream.send` filters a real vendor's answer."""

    def __init__(self) -> None:
        ResendBehaviour.__init__(self)
        InProcessUpstream.__init__(self)

    async def respond(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> UpstreamResponse:
        status, out, answer = self.answer(
            method, urlsplit(url).path, {k.lower(): v for k, v in headers}, body or b""
        )
        shown = [
            (k, v)
            for k, v in out.items()
            if k.lower() not in HOP_BY_HOP | OWN_HEADERS and not k.lower().startswith("x-keybrake")
        ]
        return UpstreamResponse(status, shown, answer)
