"""The run reaper against a fake Kubernetes API server that speaks list/watch (chunked events,
resourceVersion, BOOKMARK, 410 Gone as a status and in-stream, dropped connections), driven by
lightkube as in production, revoking through the real proxy app (served from a thread of the
test) with a revoke-only issuer token; vendor calls through the Stripe SDK to localstripe. The
`keybrake reaper` command run as a process until it is stopped is
tests/e2e/test_reaper_processes.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import stripe
from typer.testing import CliRunner

from keybrake.cli.main import app
from tests.fakes.workflow_api import FakeWorkflowAPI
from tests.reaper_harness import (
    NAMESPACE,
    ReaperThread,
    eventually,
    reaper_token,
    run_key,
    status,
)
from tests.served import ServedProxy, serve_proxy


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeWorkflowAPI]:
    fake = FakeWorkflowAPI(tmp_path)
    yield fake
    fake.stop()


def charge(proxy: ServedProxy, key: dict[str, Any]) -> None:
    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": proxy.url + "/stripe"}, max_network_retries=0
    )
    client.v1.payment_intents.create(params={"amount": 500, "currency": "usd"})


def reaper_events(proxy: ServedProxy) -> list[dict[str, Any]]:
    with proxy.admin() as client:
        rows = client.get("/vault/events", params={"action": "label.revoke", "limit": "1000"})
    return [e for e in rows.json()["data"] if e["actor"].startswith("issuer")]


@pytest.fixture
def reapers(
    api: FakeWorkflowAPI, proxy_server: ServedProxy, tmp_path: Path
) -> Iterator[list[ReaperThread]]:
    started: list[ReaperThread] = []
    yield started
    for reaper in started:
        reaper.stop()


def start(
    reapers: list[ReaperThread],
    api: FakeWorkflowAPI,
    proxy: ServedProxy,
    tmp_path: Path,
    **settings: Any,
) -> ReaperThread:
    reaper = ReaperThread(api, proxy.url, reaper_token(proxy), tmp_path, **settings)
    reapers.append(reaper)
    reaper.wait_watching()
    return reaper


@pytest.mark.parametrize("ending", ["terminated", "deleted"])
def test_a_run_that_ends_without_its_exit_handler_loses_its_key_at_once(
    ending: str,
    api: FakeWorkflowAPI,
    proxy_server: ServedProxy,
    reapers: list[ReaperThread],
    tmp_path: Path,
) -> None:
    uid = api.add("billing-agent-x7k2p", NAMESPACE)
    key = run_key(proxy_server, uid, "billing-agent-x7k2p")
    cli_key = run_key(proxy_server, None, "billing-agent-x7k2p")  # from the CLI: no uid
    elsewhere = run_key(proxy_server, uid, "billing-agent-x7k2p", cluster="prod-us")
    # Metadata no Kubernetes run could have (written by some issuer): never judged, never
    # in the way of the others.
    forged = run_key(proxy_server, "not_a uid!", "billing-agent-x7k2p")
    reaper = start(reapers, api, proxy_server, tmp_path)  # grace: an hour
    charge(proxy_server, key)

    if ending == "terminated":  # argo terminate: the exit handler never runs
        api.update(uid, shutdown="Terminate", phase="Failed")
    else:  # kubectl delete workflow: nothing runs at all
        api.delete(uid)

    revocation = reaper.next_revocation()
    assert revocation.uid == uid and revocation.revoked == 1
    assert f"was {ending}" in revocation.reason
    with pytest.raises(stripe.AuthenticationError):
        charge(proxy_server, key)
    assert status(proxy_server, key) == "revoked"
    assert status(proxy_server, cli_key) == "active"
    assert status(proxy_server, elsewhere) == "active"
    assert status(proxy_server, forged) == "active"
    [event] = reaper_events(proxy_server)
    assert event["outcome"] == "ok" and event["detail"]["revoked_keys"] == [key["key_id"]]
    assert event["detail"]["reason"] == revocation.reason
    assert event["detail"]["workflow_uid"] == uid and event["detail"]["namespace"] == NAMESPACE


def test_a_succeeded_run_whose_exit_handler_revoked_is_left_alone(
    api: FakeWorkflowAPI,
    proxy_server: ServedProxy,
    reapers: list[ReaperThread],
    tmp_path: Path,
) -> None:
    uid = api.add("billing-agent-ok", NAMESPACE)
    key = run_key(proxy_server, uid, "billing-agent-ok")
    reaper = start(reapers, api, proxy_server, tmp_path, grace=timedelta(0))
    with proxy_server.admin() as client:  # the exit handler's revoke
        answer = client.post(
            "/vault/keys/revoke",
            json={"agent_run_label": "argo/billing-agent-ok", "workflow_uid": uid},
        )
        assert answer.json()["revoked"] == 1
    api.update(uid, phase="Succeeded")
    reaper.wait_swept(lambda: reaper.it.book.runs[uid].phase == "Succeeded")
    assert reaper.it.stats.revocations == []
    # (A sweep under way as the exit handler revoked may still ask once: it revokes nothing.)
    assert [e["detail"]["revoked_keys"] for e in reaper_events(proxy_server)] in ([], [[]])
    assert status(proxy_server, key) == "revoked"


def test_a_finished_run_whose_exit_handler_failed_is_revoked_after_the_grace(
    api: FakeWorkflowAPI,
    proxy_server: ServedProxy,
    reapers: list[ReaperThread],
    tmp_path: Path,
) -> None:
    uid = api.add("billing-agent-err", NAMESPACE)
    key = run_key(proxy_server, uid, "billing-agent-err")
    late = start(reapers, api, proxy_server, tmp_path, grace=timedelta(hours=1))
    api.update(uid, phase="Error")
    late.wait_swept(lambda: late.it.book.runs[uid].phase == "Error")
    assert status(proxy_server, key) == "active"  # within the grace: the exit handler's turn
    # A reaper whose clock is past the grace revokes it.
    past = start(reapers, api, proxy_server, tmp_path, clock_offset=timedelta(hours=2))
    revocation = past.next_revocation()
    assert "is Error" in revocation.reason and revocation.revoked == 1
    assert status(proxy_server, key) == "revoked"


def test_a_key_without_a_workflow_is_revoked_after_the_orphan_grace_a_cli_key_never(
    api: FakeWorkflowAPI,
    proxy_server: ServedProxy,
    reapers: list[ReaperThread],
    tmp_path: Path,
) -> None:
    api.add("unrelated", NAMESPACE)
    orphan = run_key(proxy_server, "0b5e8a51-7c1f-4f7e-9d8e-0c1a2b3c4d5e", "gone-run")
    cli_key = run_key(proxy_server, None, "gone-run", expires_in="7d")
    other_cluster = run_key(proxy_server, "6f1d", "gone-run", cluster="prod-us")
    fresh = start(reapers, api, proxy_server, tmp_path)  # keys younger than the orphan grace
    fresh.wait_swept()
    assert fresh.it.stats.revocations == [] and status(proxy_server, orphan) == "active"

    # A reaper of one namespace sees only its runs: another namespace's keys are not orphans.
    other_namespace = proxy_server.issue(
        agent_run_label="argo/search-run",
        metadata={"uid": "3f0c", "cluster": "test", "namespace": "search"},
    )
    narrow = start(
        reapers, api, proxy_server, tmp_path, namespace=NAMESPACE, clock_offset=timedelta(hours=2)
    )
    narrow.next_revocation()  # the orphan of its own namespace
    narrow.wait_swept()
    assert status(proxy_server, other_namespace) == "active"
    later = start(reapers, api, proxy_server, tmp_path, clock_offset=timedelta(hours=2))
    later.wait_swept()
    assert status(proxy_server, other_namespace) == "revoked"  # an orphan to a cluster-wide one
    revocation = narrow.it.stats.revocations[0]
    assert revocation.uid == orphan["metadata"]["uid"] and revocation.revoked == 1
    assert "no workflow with uid" in revocation.reason
    later.wait_swept()
    # Each orphan revoked once, by whichever reaper got there first.
    assert [r.uid for r in narrow.it.stats.revocations if r.revoked] == [revocation.uid]
    assert [r.uid for r in later.it.stats.revocations if r.revoked] == ["3f0c"]
    assert status(proxy_server, cli_key) == "active"
    assert status(proxy_server, other_cluster) == "active"


def test_a_dropped_watch_resumes_from_its_version_and_sees_a_deletion_in_the_gap(
    api: FakeWorkflowAPI,
    proxy_server: ServedProxy,
    reapers: list[ReaperThread],
    tmp_path: Path,
) -> None:
    uid = api.add("billing-agent-gap", NAMESPACE)
    key = run_key(proxy_server, uid, "billing-agent-gap")
    reaper = start(reapers, api, proxy_server, tmp_path)
    known = reaper.it.watch.version
    api.hold()
    api.drop()
    eventually(lambda: reaper.it.watch.stats.errors >= 1, "the reaper to see the drop")
    api.delete(uid)  # while nobody watches
    api.release()
    revocation = reaper.next_revocation()
    assert "was deleted" in revocation.reason and status(proxy_server, key) == "revoked"
    resumed = api.watches()[-1]
    assert resumed.params["resourceVersion"] == known  # resumed, not restarted
    assert resumed.params["allowWatchBookmarks"] == "true"
    assert len(api.lists()) == 1  # no relist was needed


@pytest.mark.parametrize("gone_as", ["event", "status"])
def test_an_expired_watch_relists_and_catches_a_deletion_it_never_saw(
    gone_as: str,
    api: FakeWorkflowAPI,
    proxy_server: ServedProxy,
    reapers: list[ReaperThread],
    tmp_path: Path,
) -> None:
    api.gone_as = gone_as  # type: ignore[assignment]
    uid = api.add("billing-agent-410", NAMESPACE)
    kept = api.add("billing-agent-live", NAMESPACE)
    key = run_key(proxy_server, uid, "billing-agent-410")
    live = run_key(proxy_server, kept, "billing-agent-live")
    reaper = start(reapers, api, proxy_server, tmp_path)
    api.hold()
    api.drop()
    eventually(lambda: reaper.it.watch.stats.errors >= 1, "the reaper to see the drop")
    api.delete(uid)
    api.compact()  # the deletion event is gone from history: only a relist can tell
    api.release()
    revocation = reaper.next_revocation()
    assert "was deleted" in revocation.reason and revocation.uid == uid
    assert reaper.it.watch.stats.gone == 1 and len(api.lists()) == 2
    assert status(proxy_server, key) == "revoked" and status(proxy_server, live) == "active"


def test_bookmarks_move_the_resume_point(
    api: FakeWorkflowAPI,
    proxy_server: ServedProxy,
    reapers: list[ReaperThread],
    tmp_path: Path,
) -> None:
    api.add("quiet-run", NAMESPACE)
    reaper = start(reapers, api, proxy_server, tmp_path, namespace=NAMESPACE)
    known = reaper.it.watch.version
    # Other namespaces move the cluster's version on; this watch sees none of it...
    for n in range(3):
        api.add(f"someone-else-{n}", "other-team")
    api.compact()  # ...and its version is now too old to resume from,
    api.bookmark()  # unless a bookmark brings it forward.
    eventually(lambda: reaper.it.watch.stats.bookmarks >= 1, "a bookmark")
    assert reaper.it.watch.version == str(api.version) != known
    assert [r.name for r in reaper.it.book.runs.values()] == ["quiet-run"]
    api.drop()
    eventually(lambda: len(api.watches()) >= 2, "the watch to resume")
    assert api.watches()[-1].params["resourceVersion"] == str(api.version)
    assert reaper.it.watch.stats.gone == 0  # resumed from the bookmark: not expired


def test_two_reapers_record_one_revoke_per_key(
    api: FakeWorkflowAPI, pg_url: str, tmp_path: Path, localstripe: Any
) -> None:
    # Two replicas of the app on one PostgreSQL database, each with its own reaper.
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replicas.append(
            serve_proxy(tmp_path / name, stripe_base=localstripe.url, database_url=pg_url)
        )
    started: list[ReaperThread] = []
    try:
        uids = [api.add(f"fan-out-{n}", NAMESPACE) for n in range(5)]
        keys = [run_key(replicas[0], uid, f"fan-out-{n}") for n, uid in enumerate(uids)]
        for replica in replicas:
            started.append(ReaperThread(api, replica.url, reaper_token(replica), tmp_path))
        for reaper in started:
            reaper.wait_watching()
        for uid in uids:
            api.update(uid, shutdown="Terminate", phase="Failed")
        for reaper in started:
            reaper.wait_swept(lambda r=reaper: all(r.it.book.runs[u].terminated for u in uids))
        assert {status(replicas[1], key) for key in keys} == {"revoked"}
        recorded = [
            key_id
            for event in reaper_events(replicas[0])
            for key_id in event["detail"]["revoked_keys"]
        ]
        assert sorted(recorded) == sorted(k["key_id"] for k in keys)  # each exactly once
    finally:
        for reaper in started:
            reaper.stop()
        for replica in replicas:
            replica.stop()


def test_the_command_refuses_bad_settings(
    api: FakeWorkflowAPI, proxy_server: ServedProxy, tmp_path: Path
) -> None:
    """`keybrake reaper` (in-process) with a bad duration or no usable Kubernetes credentials:
    exit 2 with the reason, no traceback. Running it until it is stopped is in
    tests/e2e/test_reaper_processes.py."""
    env: dict[str, str | None] = {
        **{k: None for k in os.environ if k.startswith("KEYBRAKE_")},  # unset: only these count
        "KEYBRAKE_URL": proxy_server.url,
        "KEYBRAKE_API_KEY": reaper_token(proxy_server),
        "KUBECONFIG": str(api.kubeconfig(tmp_path / "kubeconfig")),
    }
    runner = CliRunner()
    bad = runner.invoke(app, ["reaper", "--cluster", "test", "--grace", "soon"], env=env)
    missing = runner.invoke(
        app, ["reaper", "--cluster", "test"], env={**env, "KUBECONFIG": str(tmp_path / "nope")}
    )
    for result in (bad, missing):
        # An exception the command did not turn into an exit code: a traceback, as a process.
        assert isinstance(result.exception, SystemExit), result.exception
    assert bad.exit_code == 2 and "--grace" in bad.stderr and "Traceback" not in bad.stderr
    assert missing.exit_code == 2 and "Kubernetes credentials" in missing.stderr
    assert "Traceback" not in missing.stderr
