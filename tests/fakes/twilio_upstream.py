"""A Twilio-shaped upstream: the Messages resource of the 2010-04-01 API, as documented.

Basic auth with the account SID and auth token (else 401, code 20003); the account SID in the
path must be the authenticated one (else 404, code 20404). `POST .../Messages.json` (form:
`To`, `From` or `MessagingServiceSid`, `Body` and/or `MediaUrl`) answers 201 with a Message whose
`price` is null and `status` "queued", as Twilio does at creation; fetching it later answers
with `status` "delivered" and `price` set (a negative decimal string, `price_unit` "USD").
Every answer carries `Twilio-Request-Id`. Errors are `{code, message, more_info, status}`.
`Calls.json` answers too, so a test can prove the proxy never let a call through.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from tests.fakes.server import GatedServer

REAL_SID = "AC" + "7e57" * 8  # the "real" account: what the proxy must keep to itself
REAL_TOKEN = "twilio_REALTOKEN_do_not_leak_" + "9" * 8
UNIT_PRICE = Decimal("0.0083")  # what the fake bills per segment once a message is "sent"


def _error(status: int, code: int, message: str, **headers: str) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status, headers=headers)


class FakeTwilio(GatedServer):
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.messages: dict[str, dict[str, Any]] = {}
        self.mode = "ok"  # ok | ratelimit | error500
        self.price_on_create: str | None = None  # e.g. "-0.00750": Twilio priced it at once
        self._ids = itertools.count(1)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        super().__init__(app)

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for r in self.requests if r["method"] == method and r["path"].endswith(suffix))

    def _sid(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):032x}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        form = parse_qs(body.decode(), keep_blank_values=True)
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "form": form,
            }
        )
        headers = {
            "Twilio-Request-Id": self._sid("RQ"),
            "Twilio-Concurrent-Requests": "1",
            "X-Home-Region": "us1",
            "X-API-Domain": "api.twilio.com",
        }
        expected = base64.b64encode(f"{REAL_SID}:{REAL_TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return _error(401, 20003, "Authenticate", **headers)
        parts = request.path.split("/")
        if len(parts) < 4 or parts[1] != "2010-04-01" or parts[2] != "Accounts":
            return _error(404, 20404, "The requested resource was not found", **headers)
        if parts[3].partition(".")[0] != REAL_SID:
            return _error(404, 20404, f"The requested resource {request.path} was not found")
        if self.mode == "ratelimit":
            headers["X-Keybrake-Cap-Hit"] = "true"  # a vendor must not be able to fake one
            return _error(429, 20429, "Too Many Requests", **headers)
        if self.mode == "error500":
            return _error(500, 20500, "Internal Server Error", **headers)
        if len(parts) == 4:  # the account itself, with its auth token, as Twilio answers it
            account = {
                "sid": REAL_SID,
                "auth_token": REAL_TOKEN,
                "status": "active",
                "uri": f"/2010-04-01/Accounts/{REAL_SID}.json",
            }
            return web.json_response(account, headers=headers)
        resource = parts[4]
        await self.at_gate()
        if resource == "Messages.json" and request.method == "POST":
            return self._create_message(form, headers)
        if resource == "Messages.json" and request.method == "GET":
            page = {
                "messages": list(self.messages.values()),
                "uri": f"/2010-04-01/Accounts/{REAL_SID}/Messages.json?PageSize=50&Page=0",
                "first_page_uri": f"/2010-04-01/Accounts/{REAL_SID}/Messages.json?Page=0",
                "next_page_uri": None,
                "previous_page_uri": None,
                "page": 0,
                "page_size": 50,
                "start": 0,
                "end": len(self.messages),
            }
            return web.json_response(page, headers=headers)
        if resource == "Messages" and len(parts) == 6 and request.method == "GET":
            sid = parts[5].removesuffix(".json")
            if sid not in self.messages:
                return _error(404, 20404, f"The requested resource {request.path} was not found")
            message = self.messages[sid]
            if message["price"] is None:  # sent and billed since it was created
                segments = int(message["num_segments"])
                message["price"] = f"-{UNIT_PRICE * segments:.5f}"
                message["status"] = "delivered"
            return web.json_response(message, headers=headers)
        if resource == "Calls.json" and request.method == "POST":
            call = {"sid": self._sid("CA"), "account_sid": REAL_SID, "status": "queued"}
            return web.json_response(call, status=201, headers=headers)
        return _error(404, 20404, f"The requested resource {request.path} was not found")

    def _create_message(self, form: dict[str, list[str]], headers: dict[str, str]) -> web.Response:
        to = form.get("To", [""])[-1]
        sender = form.get("From", [""])[-1] or None
        service = form.get("MessagingServiceSid", [""])[-1] or None
        text = form.get("Body", [""])[-1]
        media = form.get("MediaUrl", [])
        if not to:
            return _error(400, 21604, "A 'To' phone number is required.", **headers)
        if not sender and not service:
            return _error(400, 21603, "A 'From' phone number is required.", **headers)
        if not text and not media:
            return _error(400, 21602, "Message body is required.", **headers)
        sid = self._sid("SM")
        now = format_datetime(datetime.now(UTC), usegmt=True)
        # A plain count, independent of the proxy's: ASCII 160/153, anything else 70/67.
        single, part = (160, 153) if text.isascii() else (70, 67)
        segments = 1 if len(text) <= single else math.ceil(len(text) / part)
        message = {
            "account_sid": REAL_SID,
            "api_version": "2010-04-01",
            "body": text,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender,
            "messaging_service_sid": service,
            "num_media": str(len(media)),
            "num_segments": str(segments),
            "price": self.price_on_create,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {
                "media": f"/2010-04-01/Accounts/{REAL_SID}/Messages/{sid}/Media.json"
            },
            "to": to,
            "uri": f"/2010-04-01/Accounts/{REAL_SID}/Messages/{sid}.json",
        }
        self.messages[sid] = message
        return web.Response(
            status=201,
            body=json.dumps(message).encode(),
            content_type="application/json",
            charset="utf-8",
            headers=headers,
        )
