"""The run reaper: revokes a run's keys and budgets however the run ended.

Two loops share one `RunBook`:
- the watch (`keybrake.reaper.watch`) keeps the book current from the Kubernetes API;
- the sweep lists the proxy's live keys and budgets that record a workflow uid and this
  reaper's cluster, asks `runs.verdict` about each run, and revokes by label, namespace and uid.
  It runs every `resync`, at once when the watch sees a run terminated, deleted or finished, and
  when a finished run's grace runs out.

Only subjects whose metadata has `uid` and `cluster` equal to this reaper's cluster are ever
touched: keys from the CLI, the demo or another cluster record no such pair. The revoke call
reports what it changed, so when several reapers race, each key gets one "revoked" record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from keybrake.proxy.client import KeybrakeClient
from keybrake.proxy.errors import ApiError, ProxyUnreachable
from keybrake.proxy.money import parse_ts
from keybrake.reaper.runs import FINAL_PHASES, LiveSubject, RunBook, verdict
from keybrake.reaper.watch import WorkflowWatch

__all__ = ["Reaper", "Revocation"]

log = logging.getLogger("keybrake.reaper")
LIVE_LIMIT = 100_000
_UID = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # what the revoke call accepts; Kubernetes uids fit
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revoke call the sweep made, and what it changed."""

    label: str
    namespace: str
    uid: str
    reason: str
    revoked: int


@dataclass
class SweepStats:
    passes: int = 0
    generation: int = -1  # the RunBook generation the last finished pass started from
    revocations: list[Revocation] = field(default_factory=list)
    failures: int = 0


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)  # a running thing: compared and hashed by identity
class Reaper:
    """The watch and the sweep of one cluster (see this module's docstring). `watch_client` is
    the Kubernetes client the watch lists and watches with; the book, the watch and the stats
    are made here."""

    proxy: KeybrakeClient
    watch_client: InitVar[Any]
    _: KW_ONLY
    cluster: str
    namespace: str | None = None  # None: every namespace
    grace: timedelta = timedelta(seconds=60)
    orphan_grace: timedelta = timedelta(minutes=15)
    resync: timedelta = timedelta(seconds=30)
    clock: Callable[[], datetime] = _utcnow
    on_revoke: Callable[[Revocation], None] | None = None
    min_gap: float = 1.0  # seconds between sweeps at least, however many events come
    book: RunBook = field(init=False)
    stats: SweepStats = field(init=False, default_factory=SweepStats)
    watch: WorkflowWatch = field(init=False)
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self, watch_client: Any) -> None:
        self.book = RunBook(memory=max(timedelta(hours=24), self.orphan_grace * 2))
        self.watch = WorkflowWatch(
            watch_client,
            self._event,
            self._listed,
            namespace=self.namespace,
            on_broken=self._broken,
        )

    # -- the watch's callbacks -------------------------------------------------------------

    def _broken(self) -> None:
        self.book.watching = False

    async def _event(self, kind: str, obj: Mapping[str, Any]) -> None:
        self.book.watching = True
        now = self.clock()
        run = self.book.deleted(obj, now) if kind == "DELETED" else self.book.seen(obj, now)
        if run is not None and (
            run.deleted_at is not None or run.terminated or run.phase in FINAL_PHASES
        ):
            self._wake.set()

    async def _listed(self, objects: Sequence[Mapping[str, Any]]) -> None:
        for run in self.book.relisted(objects, self.clock()):
            log.info("workflow %s/%s was deleted while not watched", run.namespace, run.name)
        self._wake.set()

    # -- the sweep ---------------------------------------------------------------------------

    def subjects(self) -> list[LiveSubject]:
        """The live keys and budgets of this cluster's runs, from the proxy."""
        found: list[LiveSubject] = []
        # Every live one, as far as a list goes (100,000, newest first); beyond that many live
        # at once, the oldest would be judged only once newer ones are gone.
        # A reaper of one namespace judges only that namespace's keys: it sees no other runs.
        scope = self.namespace
        keys = self.proxy.keys_page(status="active", namespace=scope, limit=LIVE_LIMIT).data
        budgets = self.proxy.budgets_page(status="active", namespace=scope, limit=LIVE_LIMIT).data
        rows = [(k.key_id, k.agent_run_label, k.namespace, k.metadata, k.created_at) for k in keys]
        rows += [
            (b.budget_id, b.agent_run_label, b.namespace, b.metadata, b.created_at) for b in budgets
        ]
        for subject_id, label, owner_namespace, metadata, created in rows:
            uid = metadata.get("uid")
            namespace = owner_namespace or metadata.get("namespace")
            if metadata.get("cluster") != self.cluster:
                continue
            # Metadata is whatever the issuer wrote: only a uid and namespace Kubernetes could
            # have made are judged (and the revoke call would refuse anything else).
            if not isinstance(uid, str) or not _UID.fullmatch(uid):
                continue
            if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
                continue
            if self.namespace is not None and namespace != self.namespace:
                continue
            found.append(
                LiveSubject(subject_id, label, namespace, uid, parse_ts(created), owner_namespace)
            )
        return found

    def judge(self, subjects: list[LiveSubject]) -> dict[tuple[str, str | None, str], str]:
        """The runs (label, namespace, uid) to revoke now, with why (one reason per run)."""
        now = self.clock()
        self.book.forget(now)
        runs: dict[tuple[str, str | None, str], str] = {}
        for subject in subjects:
            reason = verdict(
                subject, self.book, now, grace=self.grace, orphan_grace=self.orphan_grace
            )
            if reason is not None:
                # The revoke filters on the namespace the proxy recorded (None: any; the uid and
                # cluster already name the run).
                key = (subject.label, subject.recorded_namespace, subject.uid)
                runs.setdefault(key, reason)
        return runs

    async def sweep(self) -> list[Revocation]:
        """One pass: the proxy's calls run in a thread (its client is synchronous); the book is
        read only here, on the loop that the watch writes it from."""
        subjects = await asyncio.to_thread(self.subjects)
        generation = self.book.generation
        done = []
        for (label, namespace, uid), reason in self.judge(subjects).items():
            try:
                result = await asyncio.to_thread(
                    self.proxy.revoke_label,
                    label,
                    namespace=namespace,
                    workflow_uid=uid,
                    cluster=self.cluster,
                    reason=reason,
                )
            except ApiError as exc:  # this run's revoke refused: the others still go
                self.stats.failures += 1
                log.warning("%s (uid %s): revoke refused: %s", label, uid, exc)
                continue
            changed = result.revoked + len(result.budgets)
            if not changed:
                # Its keys went between reading them and judging (the exit handler's revoke,
                # as a sweep was under way): the run was left alone after all.
                continue
            revocation = Revocation(label, namespace or "", uid, reason, changed)
            log.info("%s: revoked %d key(s) and budget(s) (%s)", label, changed, reason)
            done.append(revocation)
            self.stats.revocations.append(revocation)
            if self.on_revoke is not None:
                self.on_revoke(revocation)
        self.stats.passes += 1
        self.stats.generation = generation
        return done

    async def _sweeping(self) -> None:
        while True:
            try:
                await self.sweep()
            except (ProxyUnreachable, ApiError) as exc:
                self.stats.failures += 1
                log.warning("sweep failed: %s", exc)
            except Exception:  # an answer it did not expect: log it, and keep sweeping
                self.stats.failures += 1
                log.exception("sweep failed")
            await self._next_wake()
            await asyncio.sleep(self.min_gap)  # a rate limit under churn, not synchronisation

    async def _next_wake(self) -> None:
        timeout = self.resync.total_seconds()
        deadline = self.book.next_deadline(self.grace, self.clock())
        if deadline is not None:
            timeout = max(0.0, min(timeout, (deadline - self.clock()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    async def run(self) -> None:
        """Watch and sweep until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.watch.run())
            group.create_task(self._sweeping())
