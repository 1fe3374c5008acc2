"""The reaper's one rule (`keybrake.reaper.runs.verdict`), case by case: which runs' keys go, and
when. The end-to-end behaviour is in test_reaper.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keybrake.reaper.runs import LiveSubject, RunBook, verdict

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
GRACE = timedelta(seconds=60)
ORPHAN = timedelta(minutes=15)


def workflow(
    uid: str = "u1",
    namespace: str = "payments",
    phase: str = "Running",
    shutdown: str | None = None,
    finished: datetime | None = None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"uid": uid, "namespace": namespace, "name": "billing-agent-x"},
        "spec": {"shutdown": shutdown} if shutdown else {},
        "status": {"phase": phase},
    }
    if finished is not None:
        obj["status"]["finishedAt"] = finished.strftime("%Y-%m-%dT%H:%M:%SZ")
    return obj


def subject(age: timedelta = timedelta(minutes=1), namespace: str = "payments") -> LiveSubject:
    return LiveSubject("vk_1", "argo/billing-agent-x", namespace, "u1", NOW - age)


# (what happened, the subject, revoke? and the words of the reason)
CASES: list[tuple[str, list[tuple[str, dict[str, Any]]], LiveSubject, str | None]] = [
    ("running", [("list", workflow())], subject(), None),
    (
        "stopped, still running its exit handler",
        [("list", workflow(shutdown="Stop"))],
        subject(),
        None,
    ),
    (
        "terminated while running",
        [("list", workflow(shutdown="Terminate"))],
        subject(),
        "terminated",
    ),
    (
        "terminated and failed",
        [("list", workflow(phase="Failed", shutdown="Terminate"))],
        subject(),
        "terminated",
    ),
    ("deleted", [("list", workflow()), ("DELETED", workflow())], subject(), "deleted"),
    ("gone from a relist", [("list", workflow()), ("list-empty", {})], subject(), "deleted"),
    ("succeeded just now", [("list", workflow(phase="Succeeded", finished=NOW))], subject(), None),
    (
        "succeeded within the grace",
        [("list", workflow(phase="Succeeded", finished=NOW - GRACE + timedelta(seconds=1)))],
        subject(),
        None,
    ),
    (
        "succeeded a grace ago",
        [("list", workflow(phase="Succeeded", finished=NOW - GRACE))],
        subject(),
        "is Succeeded",
    ),
    (
        "failed long ago",
        [("list", workflow(phase="Failed", finished=NOW - timedelta(hours=3)))],
        subject(),
        "is Failed",
    ),
    (
        "error without finishedAt: counted from now",
        [("list", workflow(phase="Error"))],
        subject(),
        None,
    ),
    (
        "retried back to running",
        [
            ("list", workflow(phase="Failed", finished=NOW - timedelta(hours=1))),
            ("MODIFIED", workflow(phase="Running")),
        ],
        subject(),
        None,
    ),
    (
        "no such uid, young key",
        [("list", workflow(uid="other"))],
        subject(ORPHAN - timedelta(seconds=1)),
        None,
    ),
    (
        "no such uid, old key",
        [("list", workflow(uid="other"))],
        subject(ORPHAN),
        "no workflow with uid",
    ),
    ("not listed yet: nothing is an orphan", [], subject(timedelta(days=1)), None),
    (
        "uid of another namespace",
        [("list", workflow(namespace="search"))],
        subject(ORPHAN),
        "no workflow with uid",
    ),
    (
        "uid of another namespace, young key",
        [("list", workflow(namespace="search", shutdown="Terminate"))],
        subject(),
        None,
    ),
]


@pytest.mark.parametrize(("case", "events", "live", "reason"), CASES, ids=[c[0] for c in CASES])
def test_verdict(
    case: str, events: list[tuple[str, dict[str, Any]]], live: LiveSubject, reason: str | None
) -> None:
    book = RunBook()
    for kind, obj in events:
        if kind == "list":
            book.relisted([obj], NOW)
        elif kind == "list-empty":
            book.relisted([], NOW)
        elif kind == "DELETED":
            book.deleted(obj, NOW)
        else:
            book.seen(obj, NOW)
    said = verdict(live, book, NOW, grace=GRACE, orphan_grace=ORPHAN)
    if reason is None:
        assert said is None
    else:
        assert said is not None and reason in said


def test_no_key_is_an_orphan_while_the_watch_is_broken() -> None:
    """What happened while the watch was down is unknown: a run started then is not yet in the
    book, and its key must not be taken for an orphan's. A deletion seen is still acted on."""
    book = RunBook()
    book.relisted([workflow(uid="other"), workflow(uid="gone")], NOW)
    book.watching = False  # the watch broke
    old = subject(ORPHAN * 2)
    assert verdict(old, book, NOW, grace=GRACE, orphan_grace=ORPHAN) is None
    book.deleted(workflow(uid="gone"), NOW)
    gone = LiveSubject("vk_2", "argo/x", "payments", "gone", NOW - ORPHAN)
    assert "deleted" in (verdict(gone, book, NOW, grace=GRACE, orphan_grace=ORPHAN) or "")
    book.watching = True  # an event or a list came through again
    assert "no workflow" in (verdict(old, book, NOW, grace=GRACE, orphan_grace=ORPHAN) or "")


def test_tombstones_are_forgotten_after_their_memory() -> None:
    book = RunBook(memory=timedelta(hours=1))
    book.relisted([workflow()], NOW)
    book.deleted(workflow(), NOW)
    book.forget(NOW + timedelta(minutes=59))
    assert "u1" in book.runs
    book.forget(NOW + timedelta(hours=2))
    assert "u1" not in book.runs


def test_the_next_deadline_is_the_earliest_grace_still_to_run_out() -> None:
    book = RunBook()
    book.relisted(
        [
            workflow("a", phase="Succeeded", finished=NOW - timedelta(seconds=50)),
            workflow("b", phase="Failed", finished=NOW - timedelta(seconds=10)),
            workflow("c", phase="Failed", finished=NOW - timedelta(hours=1)),  # already due
            workflow("d"),
        ],
        NOW,
    )
    assert book.next_deadline(GRACE, NOW) == NOW + timedelta(seconds=10)
