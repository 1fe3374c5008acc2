"""The proxy app served on a loopback socket from a thread of the test process.

What a test that needs a real socket (an official SDK, a raw HTTP client, a redirect) but not a
real process uses: the same `build_app(settings)` that `keybrake serve` runs, under uvicorn, on a
socket bound before the server starts, so nothing races for a port. It starts in milliseconds,
where a `keybrake serve` process takes over a second to import. Tests about the process itself
(serve flags, workers, TLS, kill -9, restarts, replicas) start one: `tests/proxyproc.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from keybrake.proxy.app import build_app
from keybrake.proxy.settings import Settings
from tests.fakes.server import bound_socket
from tests.proxyproc import ADMIN_KEY, STRIPE_SECRET, issue_key

__all__ = ["ServedProxy", "serve_proxy"]

_TLS = ssl.create_default_context()


class _Server(uvicorn.Server):
    """Says when it serves: after the app's start-up (migrations included) and the bind."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()

    async def startup(self, sockets: list[Any] | None = None) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        self.ready.set()

    def request_stop(self) -> None:
        self.should_exit = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)

    async def main_loop(self) -> None:
        # uvicorn polls `should_exit` every 0.1 s; a test stops its proxy once it is done, so
        # wake on the request instead (still refreshing the Date header every second).
        while not await self.on_tick(0):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=1)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        # uvicorn waits 0.1 s for connections to take the shutdown in; with none open there is
        # nothing to wait for. Then, as uvicorn: requests in flight finish, the app shuts down.
        if self.server_state.connections:
            await super().shutdown(sockets)
            return
        for server in self.servers:
            server.close()
        await self._wait_tasks_to_complete()
        await self.lifespan.shutdown()


class ServedProxy:
    """What tests use of a proxy: its URL, admin client and database; `ProxyProcess`'s surface
    without the process."""

    def __init__(
        self, url: str, database_url: str, server: _Server, thread: threading.Thread
    ) -> None:
        self.url = url
        self.admin_key = ADMIN_KEY
        self.database_url = database_url
        self.ca_file: Path | None = None
        self._server: _Server = server
        self._thread = thread
        self._log_handler: logging.Handler | None = None
        self.log_path: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment a client process of this proxy runs with (as `ProxyProcess.env`)."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
        return {**keep, "KEYBRAKE_API_KEY": self.admin_key, "KEYBRAKE_URL": self.url}

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=30,
            verify=_TLS,  # (httpx would load the CA bundle anew for every client: ~40 ms)
        )

    def issue(self, **spec: Any) -> dict[str, Any]:
        return issue_key(self.admin(), **spec)

    def log(self) -> str:
        """What the proxy's loggers wrote while it served."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Shut down as `keybrake serve` does on SIGTERM: calls in flight are settled first."""
        self._server.request_stop()
        self._thread.join(timeout=30)
        if self._log_handler is not None:
            logging.getLogger("keybrake").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


def serve_proxy(
    tmp_path: Path,
    *,
    stripe_base: str | None = None,
    database_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> ServedProxy:
    """Serve the app on a free loopback port until `stop()`; settings as `start_proxy` takes
    them (`extra_env` holds `KEYBRAKE_*` names)."""
    database_url = database_url or f"sqlite:///{tmp_path / 'keybrake.db'}"
    fields: dict[str, Any] = {
        "api_key": ADMIN_KEY,
        "database_url": database_url,
        "stripe_secret_key": STRIPE_SECRET,
    }
    if stripe_base:
        fields["stripe_api_base"] = stripe_base
    for name, value in (extra_env or {}).items():
        fields[name.removeprefix("KEYBRAKE_").lower()] = value
    app = build_app(Settings(**fields))
    # socket(fileno=) keeps the socket's real family and protocol: asyncio then turns Nagle off
    # on what it accepts (as `keybrake serve --fd` does), where a kept-alive connection's next
    # request would otherwise wait ~40 ms.
    sock = socket.socket(fileno=bound_socket().detach())
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, loop="asyncio", http="httptools", lifespan="on"
    )
    server = _Server(config)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # reported to the test that started it
            failed.append(exc)
        finally:
            sock.close()
            server.ready.set()

    thread = threading.Thread(target=run, name=f"keybrake-{port}", daemon=True)
    served = ServedProxy(f"http://127.0.0.1:{port}", database_url, server, thread)
    served.log_path = tmp_path / f"proxy-{port}.log"
    handler = logging.FileHandler(served.log_path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("keybrake").addHandler(handler)
    served._log_handler = handler
    thread.start()
    server.ready.wait(timeout=30)
    if not server.started:
        served.stop()
        raise RuntimeError(f"the proxy did not start: {failed[0] if failed else 'no reason'}")
    return served
