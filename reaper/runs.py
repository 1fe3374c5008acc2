"""What the reaper knows of the cluster's Workflows, and the one rule that says when a run's keys
must go. Pure: no I/O, the time is passed in, so every case is a table row in the tests.

A run's keys are revoked when:
- its Workflow was **terminated** (`spec.shutdown: Terminate`: `argo terminate` skips the exit
  handler, so nothing else will revoke them) — at once;
- its Workflow was **deleted** (a deleted Workflow runs no exit handler) — at once;
- its Workflow reached a **final phase** (Succeeded, Failed, Error) and they are still live
  `grace` later (the exit handler normally revokes them before the phase is final; this is the
  backstop for an exit handler that failed or a controller outage);
- no Workflow with the key's uid exists in the key's namespace, once the reaper has listed the
  cluster, and the key is older than `orphan_grace` (its run was deleted while nobody watched, or
  the key outlived its cluster's memory of it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

__all__ = ["FINAL_PHASES", "LiveSubject", "Run", "RunBook", "verdict"]

FINAL_PHASES = frozenset({"Succeeded", "Failed", "Error"})


@dataclass(slots=True)
class Run:
    """One Workflow as last seen."""

    uid: str
    namespace: str
    name: str
    phase: str
    terminated: bool
    # When it finished: its status.finishedAt, else when the reaper first saw it finished.
    final_since: datetime | None = None
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LiveSubject:
    """A live key or budget that records a workflow uid of this reaper's cluster."""

    subject_id: str
    label: str
    namespace: str
    uid: str
    created_at: datetime
    # The namespace the proxy recorded for it (None: an older key, known by its metadata only);
    # what the revoke call filters on.
    recorded_namespace: str | None = None


def _finished_at(obj: Mapping[str, Any]) -> datetime | None:
    text = (obj.get("status") or {}).get("finishedAt")
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo is not None else None


def _fields(obj: Mapping[str, Any]) -> tuple[str, str, str, str, bool]:
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    return (
        str(metadata.get("uid") or ""),
        str(metadata.get("namespace") or ""),
        str(metadata.get("name") or ""),
        str(status.get("phase") or ""),
        spec.get("shutdown") == "Terminate",
    )


class RunBook:
    """The Workflows seen through list and watch, and those deleted (kept as tombstones for
    `memory`, long enough for any key of theirs to be revoked)."""

    def __init__(self, memory: timedelta = timedelta(hours=24)) -> None:
        self.runs: dict[str, Run] = {}
        self.memory = memory
        self.listed = False  # True once a full list has been applied
        # False while the watch is broken: what happened meanwhile is unknown, so no key is
        # judged an orphan until the watch is back (a deletion is still acted on when seen).
        self.watching = False
        self.generation = 0  # counts every change applied, so a sweep can say what it saw

    def seen(self, obj: Mapping[str, Any], now: datetime) -> Run | None:
        """An ADDED or MODIFIED Workflow (or one from a list)."""
        uid, namespace, name, phase, terminated = _fields(obj)
        if not uid:
            return None
        self.generation += 1
        run = self.runs.get(uid)
        if run is None:
            run = Run(uid, namespace, name, phase, terminated)
            self.runs[uid] = run
        run.phase, run.terminated = phase, terminated
        if phase in FINAL_PHASES:
            # A reaper that starts after a run finished counts the grace from the finish.
            run.final_since = _finished_at(obj) or run.final_since or now
        else:
            run.final_since = None  # `argo retry` puts a finished run back to Running
        run.deleted_at = None
        return run

    def deleted(self, obj: Mapping[str, Any], now: datetime) -> Run | None:
        run = self.seen(obj, now)
        if run is not None:
            run.deleted_at = now
        return run

    def relisted(self, objs: Iterable[Mapping[str, Any]], now: datetime) -> list[Run]:
        """Apply a full list. A watch that broke (or expired with 410) does not replay what
        happened in the gap: a run known before and absent now was deleted meanwhile. Returns
        those runs."""
        present: set[str] = set()
        for obj in objs:
            run = self.seen(obj, now)
            if run is not None:
                present.add(run.uid)
        gone = []
        for run in self.runs.values():
            if run.uid not in present and run.deleted_at is None:
                run.deleted_at = now
                gone.append(run)
        self.listed = True
        self.watching = True
        self.generation += 1
        return gone

    def forget(self, now: datetime) -> None:
        """Drop tombstones older than `memory`."""
        old = [u for u, r in self.runs.items() if r.deleted_at and now - r.deleted_at > self.memory]
        for uid in old:
            del self.runs[uid]

    def next_deadline(self, grace: timedelta, now: datetime) -> datetime | None:
        """The earliest time after `now` that a finished run's grace runs out."""
        ends = [
            r.final_since + grace
            for r in self.runs.values()
            if r.final_since is not None and r.deleted_at is None and r.final_since + grace > now
        ]
        return min(ends, default=None)


def verdict(
    subject: LiveSubject,
    book: RunBook,
    now: datetime,
    *,
    grace: timedelta,
    orphan_grace: timedelta,
) -> str | None:
    """Why `subject` must be revoked now, or None to leave it."""
    run = book.runs.get(subject.uid)
    if run is not None and run.namespace != subject.namespace:
        run = None  # a uid recorded with another namespace is not this run
    if run is None:
        if book.listed and book.watching and now - subject.created_at >= orphan_grace:
            return (
                f"reaper: no workflow with uid {subject.uid} in namespace {subject.namespace} "
                f"(key older than {_span(orphan_grace)})"
            )
        return None
    if run.deleted_at is not None:
        return f"reaper: workflow {run.namespace}/{run.name} was deleted"
    if run.terminated:
        return f"reaper: workflow {run.namespace}/{run.name} was terminated"
    if run.final_since is not None and now - run.final_since >= grace:
        return (
            f"reaper: workflow {run.namespace}/{run.name} is {run.phase} and its keys were still "
            f"live {_span(grace)} later"
        )
    return None


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 3600 == 0 and seconds:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds:
        return f"{seconds // 60}m"
    return f"{seconds}s"
