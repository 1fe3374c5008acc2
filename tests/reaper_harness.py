"""Run the reaper for a test: in a thread of its own with its own event loop, its real clients
(lightkube over HTTPS to the fake Workflow API with a kubeconfig, the admin client to the real
proxy app, served from a thread of the test), and ways to wait for what it did without sleeping;
and what the reaper tests make through the proxy: its token, the keys of runs, their status."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig

from keybrake.proxy.client import KeybrakeClient
from keybrake.reaper.reaper import Reaper, Revocation
from tests.fakes.workflow_api import FakeWorkflowAPI
from tests.served import ServedProxy

NAMESPACE = "payments"


def eventually(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Wait (bounded) for a condition another thread brings about."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling an observable condition, not waiting out a duration


def reaper_token(proxy: ServedProxy) -> str:
    """The reaper's credential: an issuer that may read and revoke argo/ runs, never issue."""
    with proxy.admin() as client:
        response = client.post(
            "/vault/issuers",
            json={
                "name": f"reaper-{uuid.uuid4().hex[:8]}",
                "label_prefix": "argo/",
                "may_issue": False,
            },
        )
    assert response.status_code == 201, response.text
    return str(response.json()["issuer_token"])


def run_key(
    proxy: ServedProxy, uid: str | None, workflow: str, *, cluster: str = "test", **extra: Any
) -> dict[str, Any]:
    """A key as the issue step makes it: the run's label, namespace, uid and cluster."""
    metadata: dict[str, Any] = {"workflow": workflow, "namespace": NAMESPACE}
    if uid is not None:
        metadata.update(uid=uid, cluster=cluster)
    return proxy.issue(agent_run_label=f"argo/{workflow}", metadata=metadata, **extra)


def status(proxy: ServedProxy, key: dict[str, Any]) -> str:
    with proxy.admin() as client:
        return str(client.get(f"/vault/keys/{key['key_id']}").json()["status"])


class ReaperThread:
    def __init__(
        self,
        api: FakeWorkflowAPI,
        proxy_url: str,
        token: str,
        folder: Path,
        *,
        cluster: str = "test",
        namespace: str | None = None,
        grace: timedelta = timedelta(hours=1),
        orphan_grace: timedelta = timedelta(hours=1),
        resync: timedelta = timedelta(minutes=10),
        clock_offset: timedelta = timedelta(0),
        watch_backoff: tuple[float, float] = (0.01, 1.0),
    ) -> None:
        self.api = api
        self.revocations: queue.Queue[Revocation] = queue.Queue()
        kubeconfig = api.kubeconfig(folder / f"kubeconfig-{id(self)}")
        self.proxy = KeybrakeClient(proxy_url, token)
        self._kubeconfig = kubeconfig
        self._settings: dict[str, Any] = {
            "cluster": cluster,
            "namespace": namespace,
            "grace": grace,
            "orphan_grace": orphan_grace,
            "resync": resync,
            "clock": lambda: datetime.now(UTC) + clock_offset,
            "min_gap": 0.0,
        }
        self.reaper: Reaper | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        started = threading.Event()

        def run() -> None:
            async def main() -> None:
                kube = AsyncClient(KubeConfig.from_file(self._kubeconfig))
                self.reaper = Reaper(
                    self.proxy, kube, on_revoke=self.revocations.put, **self._settings
                )
                # A dropped watch is resumed after `watch_backoff` (production: 0.2 s, doubling):
                # a rate limit against a failing API server, nothing a test waits out.
                self.reaper.watch.backoff = watch_backoff
                self._loop = asyncio.get_running_loop()
                self._task = asyncio.current_task()
                started.set()
                try:
                    await self.reaper.run()
                finally:
                    await kube.close()

            try:
                asyncio.run(main())
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # surfaced by stop()
                self.error = exc
            finally:
                started.set()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait(10)

    @property
    def it(self) -> Reaper:
        assert self.reaper is not None, self.error
        return self.reaper

    def wait_watching(self) -> None:
        """Until it has listed and its watch is open."""
        eventually(
            lambda: self.it.book.listed and self.api.open_watches() > 0,
            "the reaper to list and watch",
        )

    def wait_swept(self, check: Callable[[], bool] | None = None) -> None:
        """Until a sweep has judged the book as it is now (after `check` holds on it)."""
        if check is not None:
            eventually(check, "the reaper to see the change")
        target = self.it.book.generation
        self.poke()
        eventually(lambda: self.it.stats.generation >= target, "a sweep of the current book")

    def poke(self) -> None:
        """Wake the sweep now (as a watch event would)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.it._wake.set)

    def next_revocation(self, timeout: float = 20) -> Revocation:
        return self.revocations.get(timeout=timeout)

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)
        self.proxy.close()
        if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
            raise self.error
