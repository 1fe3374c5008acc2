"""A webhook receiver (Slack-like) for the alert tests: records every POST, and can be down
(answering 503) until told otherwise."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.server import ThreadedServer


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    def signed_by(self, secret: bytes) -> bool:
        expected = "sha256=" + hmac.new(secret, self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-keybrake-signature", ""), expected)


class WebhookReceiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.refused = 0
        self.down = False
        self._lock = threading.Lock()
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.server = ThreadedServer(app)
        self.url = self.server.url + "/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            if self.down:
                self.refused += 1
                return web.Response(status=503, text="down for maintenance")
            self.received.append(Received({k.lower(): v for k, v in request.headers.items()}, body))
        return web.Response(text="ok")

    def unique(self) -> list[Received]:
        """What a receiver keeps after dropping repeats by delivery id, in arrival order."""
        with self._lock:
            seen: dict[str, Received] = {}
            for item in self.received:
                seen.setdefault(item.headers["x-keybrake-delivery"], item)
            return list(seen.values())

    def stop(self) -> None:
        self.server.stop()
