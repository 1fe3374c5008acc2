"""Scoped issuers instead of the root token: an issuer token issues within its policy and gets a
403 naming the limit otherwise, sees and revokes only its own labels (and namespaces), stops at
once when deleted; issuing with an Idempotency-Key replaces instead of duplicating; every action
and refused login is recorded. In-process for the rules, the app on real sockets for the races
(two replicas over one PostgreSQL database); two workers of one `keybrake serve` process race in
tests/e2e/test_issuers_processes.py."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from keybrake.proxy.upstream import UpstreamResponse
from tests import test_replicas
from tests.inproc import Clock, StubUpstream, app_client
from tests.proxyproc import ProxyProcess
from tests.served import ServedProxy, serve_proxy
from tests.test_replicas import stop_all

# Its PostgreSQL tests share one database, as new before each (see tests.test_replicas).
pg_url = test_replicas.pg_url

STRIPE_PI = "POST /v1/payment_intents"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

PAYMENTS = {
    "name": "payments",
    "label_prefix": "argo/payments-",
    "allowed_vendors": ["stripe"],
    "allowed_endpoints": [STRIPE_PI, "GET /v1/payment_intents/*"],
    "max_daily_usd_cap": 100,
    "max_total_usd_cap": 500,
    "max_expires_in": "6h",
    "max_active_keys": 3,
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create_issuer(client: TestClient, **spec: Any) -> dict[str, Any]:
    response = client.post("/vault/issuers", json=spec)
    assert response.status_code == 201, response.text
    return dict(response.json())


def key_body(**spec: Any) -> dict[str, Any]:
    body = {
        "vendor": "stripe",
        "daily_usd_cap": 50,
        "total_usd_cap": 200,
        "allowed_endpoints": [STRIPE_PI],
        "expires_in": "2h",
        "agent_run_label": "argo/payments-run-1",
    }
    body.update(spec)
    return body


def events(client: TestClient, **params: str) -> list[dict[str, Any]]:
    response = client.get("/vault/events", params={"limit": "1000", **params})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def test_an_issuer_issues_within_its_policy(tmp_path: Path) -> None:
    with app_client(tmp_path, Clock(NOW), resend_api_key="re_real") as client:
        issuer = create_issuer(client, **PAYMENTS)
        token = issuer["issuer_token"]
        assert token.startswith("kbi_") and issuer["static_token"] is True
        shown = client.get(f"/vault/issuers/{issuer['issuer_id']}").json()
        assert "issuer_token" not in shown and token not in str(shown)
        response = client.post("/vault/keys", json=key_body(), headers=bearer(token))
        assert response.status_code == 201, response.text
        key = response.json()
        assert key["issuer_id"] == issuer["issuer_id"]
        budget = client.post(
            "/vault/budgets",
            json={
                "agent_run_label": "argo/payments-run-1",
                "daily_usd_cap": 100,
                "total_usd_cap": 400,
            },
            headers=bearer(token),
        )
        assert budget.status_code == 201, budget.text
        # A key with no caps of its own, bounded by its budget's.
        on_budget = client.post(
            "/vault/keys",
            json=key_body(
                daily_usd_cap=None,
                total_usd_cap=None,
                expires_in=None,
                budget_id=budget.json()["budget_id"],
            ),
            headers=bearer(token),
        )
        assert on_budget.status_code == 201, on_budget.text
        recorded = events(client, issuer_id=issuer["issuer_id"])
    assert [e["action"] for e in reversed(recorded)] == ["key.issue", "budget.create", "key.issue"]
    assert {e["outcome"] for e in recorded} == {"ok"}
    assert recorded[-1]["actor"] == f"issuer {issuer['issuer_id']} (payments)"


REFUSALS = [
    ({"vendor": "resend", "allowed_endpoints": ["POST /emails"]}, "allowed_vendors"),
    ({"allowed_endpoints": ["POST /v1/refunds"]}, "allowed_endpoints"),
    ({"allowed_endpoints": ["POST /v1/*"]}, "allowed_endpoints"),  # wider than the issuer's
    ({"daily_usd_cap": 150}, "max_daily_usd_cap"),
    ({"total_usd_cap": 600}, "max_total_usd_cap"),
    ({"total_usd_cap": None}, "max_total_usd_cap"),  # nothing bounds its life within $500
    ({"daily_usd_cap": None, "total_usd_cap": 499}, "max_daily_usd_cap"),  # nor its day
    ({"expires_in": "7h"}, "max_expires_in"),
    ({"agent_run_label": "argo/growth-run-1"}, "label_prefix"),
]


@pytest.mark.parametrize(
    ("change", "limit"), REFUSALS, ids=[r[1] + str(i) for i, r in enumerate(REFUSALS)]
)
def test_an_issuer_is_refused_outside_its_policy_naming_the_limit(
    tmp_path: Path, change: dict[str, Any], limit: str
) -> None:
    with app_client(tmp_path, Clock(NOW), resend_api_key="re_real") as client:
        issuer = create_issuer(client, **PAYMENTS)
        body = {k: v for k, v in key_body(**change).items() if v is not None}
        response = client.post("/vault/keys", json=body, headers=bearer(issuer["issuer_token"]))
        keys = client.get("/vault/keys").json()["data"]
        refused = events(client, refused="true")
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["type"] == "permission_error" and error["code"] == limit
    assert keys == []  # nothing issued
    assert [(e["action"], e["issuer_id"]) for e in refused] == [("key.issue", issuer["issuer_id"])]
    assert refused[0]["outcome"] == f"refused: {error['message']}"


def test_an_issuer_bounds_the_connected_accounts_its_keys_act_on(tmp_path: Path) -> None:
    """A key's `allowed_accounts` names the Stripe connected accounts it may act on (payouts
    from them, direct charges on them): an issuer's policy bounds them like its endpoints."""
    with app_client(tmp_path, Clock(NOW)) as client:
        one = create_issuer(client, **{**PAYMENTS, "allowed_accounts": ["acct_1"]})
        platform = create_issuer(
            client,
            **{**PAYMENTS, "name": "platform", "label_prefix": "argo/p-"},
            allowed_accounts=[],
        )
        anyone = create_issuer(client, **{**PAYMENTS, "name": "any", "label_prefix": "argo/a-"})
        bad = client.post(
            "/vault/issuers", json={**PAYMENTS, "name": "bad", "allowed_accounts": ["cus_1"]}
        )

        def issue(issuer: dict[str, Any], label: str, accounts: list[str]) -> httpx.Response:
            body = key_body(agent_run_label=label, allowed_accounts=accounts)
            return client.post("/vault/keys", json=body, headers=bearer(issuer["issuer_token"]))

        answers = {
            "within": issue(one, "argo/payments-1", ["acct_1"]),
            "own account": issue(one, "argo/payments-2", []),
            "another": issue(one, "argo/payments-3", ["acct_1", "acct_2"]),
            "any": issue(one, "argo/payments-4", ["*"]),
            "platform only": issue(platform, "argo/p-1", ["acct_1"]),
            "unbounded": issue(anyone, "argo/a-1", ["*"]),
        }
        shown = client.get(f"/vault/issuers/{one['issuer_id']}").json()
    assert {what: a.status_code for what, a in answers.items()} == {
        "within": 201,
        "own account": 201,
        "another": 403,
        "any": 403,
        "platform only": 403,
        "unbounded": 201,
    }
    refused = answers["another"].json()["error"]
    assert refused == {
        "type": "permission_error",
        "code": "allowed_accounts",
        "message": "allowed_accounts: acct_2 is not within this issuer's connected accounts "
        "(acct_1)",
    }
    assert "the platform account only" in answers["platform only"].json()["error"]["message"]
    assert (one["allowed_accounts"], shown["allowed_accounts"]) == (["acct_1"], ["acct_1"])
    assert (platform["allowed_accounts"], anyone["allowed_accounts"]) == ([], None)
    assert bad.status_code == 400 and "not a connected account id" in bad.text


def test_the_active_key_limit_counts_live_keys_only(tmp_path: Path) -> None:
    with app_client(tmp_path, Clock(NOW)) as client:
        issuer = create_issuer(client, **PAYMENTS)
        auth = bearer(issuer["issuer_token"])
        made = [client.post("/vault/keys", json=key_body(), headers=auth) for _ in range(4)]
        assert [r.status_code for r in made] == [201, 201, 201, 403]
        assert made[3].json()["error"]["code"] == "max_active_keys"
        client.delete(f"/vault/keys/{made[0].json()['key_id']}", headers=auth)
        again = client.post("/vault/keys", json=key_body(), headers=auth)
    assert again.status_code == 201, again.text


def test_an_issuer_sees_and_touches_only_its_own_labels(tmp_path: Path) -> None:
    upstream = StubUpstream()
    with app_client(tmp_path, Clock(NOW), upstream=upstream) as client:
        payments = create_issuer(client, **PAYMENTS)
        growth = create_issuer(
            client, name="growth", label_prefix="argo/growth-", max_daily_usd_cap=100
        )
        mine = client.post(
            "/vault/keys", json=key_body(), headers=bearer(payments["issuer_token"])
        ).json()
        theirs = client.post(
            "/vault/keys",
            json=key_body(agent_run_label="argo/growth-run-9"),
            headers=bearer(growth["issuer_token"]),
        ).json()
        for key in (mine, theirs):  # one priced call each, for the audit log
            call = client.post(
                "/stripe/v1/payment_intents",
                content=b"amount=100&currency=usd",
                headers={
                    **bearer(key["vault_key"]),
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
            assert call.status_code == 200, call.text
        auth = bearer(payments["issuer_token"])
        listed = client.get("/vault/keys", headers=auth).json()["data"]
        audit = client.get("/vault/audit", headers=auth).json()["data"]
        shown = client.get(f"/vault/keys/{theirs['key_id']}", headers=auth)
        revoked = client.delete(f"/vault/keys/{theirs['key_id']}", headers=auth)
        patched = client.patch(
            f"/vault/keys/{theirs['key_id']}",
            json={"daily_usd_cap": 1, "reason": "not mine"},
            headers=auth,
        )
        by_label = client.post(
            "/vault/keys/revoke", json={"agent_run_label": "argo/growth-run-9"}, headers=auth
        )
        filtered = client.get("/vault/keys?label=argo/growth-run-9", headers=auth)
        other_audit = client.get(f"/vault/audit?key_id={theirs['key_id']}", headers=auth)
        still = client.get(f"/vault/keys/{theirs['key_id']}").json()
        for forbidden in ("/vault/issuers", "/vault/events", "/vault/pricing"):
            assert client.get(forbidden, headers=auth).status_code == 403
        prune = client.post("/vault/audit/prune", json={"before": "1d"}, headers=auth)
    assert [k["key_id"] for k in listed] == [mine["key_id"]]
    assert {r["key_id"] for r in audit} == {mine["key_id"]}
    for response in (shown, revoked, patched):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "label_prefix"
    assert by_label.status_code == filtered.status_code == 403
    assert other_audit.json()["data"] == []
    assert still["status"] == "active" and still["daily_usd_cap"] == "50.00"
    assert prune.status_code == 403


def test_a_deleted_issuers_token_is_refused_on_the_next_call(tmp_path: Path) -> None:
    with app_client(tmp_path, Clock(NOW)) as client:
        issuer = create_issuer(client, **PAYMENTS)
        auth = bearer(issuer["issuer_token"])
        kept = client.post("/vault/keys", json=key_body(), headers=auth).json()
        assert client.get("/vault/keys", headers=auth).status_code == 200
        deleted = client.delete(f"/vault/issuers/{issuer['issuer_id']}")
        after = client.get("/vault/keys", headers=auth)
        key = client.get(f"/vault/keys/{kept['key_id']}").json()
        other = create_issuer(client, **{**PAYMENTS, "name": "payments-2"})
        doomed = client.post(
            "/vault/keys", json=key_body(), headers=bearer(other["issuer_token"])
        ).json()
        bulk = client.delete(f"/vault/issuers/{other['issuer_id']}?revoke=true")
        doomed_now = client.get(f"/vault/keys/{doomed['key_id']}").json()
        twice = client.delete(f"/vault/issuers/{other['issuer_id']}")
        logins = events(client, action="login.refused")
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
    assert after.status_code == 401
    assert key["status"] == "active"  # keys stay until revoked or expired...
    assert bulk.json()["revoked_keys"] == [doomed["key_id"]]  # ...or revoked with it
    assert doomed_now["status"] == "revoked"
    assert twice.status_code == 409
    assert len(logins) == 1 and logins[0]["outcome"] == "refused: unknown or deleted issuer token"
    assert issuer["issuer_token"] not in str(logins)


def test_issuers_are_managed_with_the_admin_token_only(tmp_path: Path) -> None:
    with app_client(tmp_path, Clock(NOW)) as client:
        issuer = create_issuer(client, **PAYMENTS)
        auth = bearer(issuer["issuer_token"])
        made = client.post("/vault/issuers", json={**PAYMENTS, "name": "mine"}, headers=auth)
        removed = client.delete(f"/vault/issuers/{issuer['issuer_id']}", headers=auth)
        clash = client.post("/vault/issuers", json=PAYMENTS)
        bad = client.post(
            "/vault/issuers", json={**PAYMENTS, "name": "x", "allowed_vendors": ["paypal"]}
        )
        no_prefix = client.post("/vault/issuers", json={"name": "y", "label_prefix": ""})
    assert made.status_code == removed.status_code == 403
    assert made.json()["error"]["code"] == "admin_only"
    assert clash.status_code == 409 and bad.status_code == 400 and no_prefix.status_code == 400


def test_kubernetes_bindings_cannot_overlap(tmp_path: Path) -> None:
    binding = {"namespaces": ["team-a"], "service_accounts": ["keybrake-issuer"]}
    with app_client(tmp_path, Clock(NOW)) as client:
        first = create_issuer(client, name="a", label_prefix="argo/", kubernetes=binding)
        again = client.post(
            "/vault/issuers",
            json={
                "name": "b",
                "label_prefix": "argo/",
                "kubernetes": {"namespaces": ["team-a", "team-b"], "service_accounts": ["*"]},
            },
        )
        other_audience = client.post(
            "/vault/issuers",
            json={
                "name": "c",
                "label_prefix": "argo/",
                "kubernetes": {**binding, "audience": "elsewhere"},
            },
        )
    assert first["issuer_token"] is None and first["static_token"] is False
    assert again.status_code == 409 and "team-a/" in again.json()["error"]["message"]
    assert other_audience.status_code == 201


def test_an_issuer_bound_to_namespaces_issues_and_sees_only_those(tmp_path: Path) -> None:
    binding = {"namespaces": ["team-a"], "service_accounts": ["keybrake-issuer"]}
    with app_client(tmp_path, Clock(NOW)) as client:
        issuer = create_issuer(
            client, name="team-a", label_prefix="argo/", kubernetes=binding, static_token=True
        )
        auth = bearer(issuer["issuer_token"])
        missing = client.post("/vault/keys", json=key_body(agent_run_label="argo/x"), headers=auth)
        elsewhere = client.post(
            "/vault/keys", json=key_body(agent_run_label="argo/x", namespace="team-b"), headers=auth
        )
        own = client.post(
            "/vault/keys", json=key_body(agent_run_label="argo/x", namespace="team-a"), headers=auth
        )
        # The same workflow name in another namespace, issued by the admin.
        foreign = client.post(
            "/vault/keys", json=key_body(agent_run_label="argo/x", namespace="team-b")
        ).json()
        listed = client.get("/vault/keys", headers=auth).json()["data"]
        revoke = client.post("/vault/keys/revoke", json={"agent_run_label": "argo/x"}, headers=auth)
        foreign_now = client.get(f"/vault/keys/{foreign['key_id']}").json()
    assert missing.status_code == elsewhere.status_code == 403
    assert missing.json()["error"]["code"] == "namespaces"
    assert own.status_code == 201 and own.json()["namespace"] == "team-a"
    assert [k["key_id"] for k in listed] == [own.json()["key_id"]]
    assert revoke.json()["revoked"] == 1 and foreign_now["status"] == "active"


def test_revoking_a_label_can_be_narrowed_to_one_run(tmp_path: Path) -> None:
    """Two workflows named `nightly` in two namespaces: the exit handler of one revokes only its
    own keys, by namespace and workflow uid."""
    with app_client(tmp_path, Clock(NOW)) as client:
        runs = {
            ns: client.post(
                "/vault/keys",
                json=key_body(
                    agent_run_label="argo/nightly", namespace=ns, metadata={"uid": f"uid-{ns}"}
                ),
            ).json()
            for ns in ("team-a", "team-b")
        }
        wrong_uid = client.post(
            "/vault/keys/revoke",
            json={
                "agent_run_label": "argo/nightly",
                "namespace": "team-a",
                "workflow_uid": "uid-x",
            },
        ).json()
        one = client.post(
            "/vault/keys/revoke",
            json={
                "agent_run_label": "argo/nightly",
                "namespace": "team-a",
                "workflow_uid": "uid-team-a",
            },
        ).json()
        states = {
            ns: client.get(f"/vault/keys/{k['key_id']}").json()["status"] for ns, k in runs.items()
        }
    assert wrong_uid["revoked"] == 0
    assert one["revoked"] == 1 and states == {"team-a": "revoked", "team-b": "active"}


def test_a_revoke_only_issuer_reads_and_revokes_but_never_issues(tmp_path: Path) -> None:
    """The reaper's credential: `may_issue: false` with the argo/ prefix."""
    with app_client(tmp_path, Clock(NOW)) as client:
        reaper = create_issuer(client, name="reaper", label_prefix="argo/", may_issue=False)
        assert reaper["may_issue"] is False
        auth = bearer(reaper["issuer_token"])
        key = client.post("/vault/keys", json=key_body()).json()  # the admin's
        refused = {
            "key": client.post("/vault/keys", json=key_body(), headers=auth),
            "budget": client.post(
                "/vault/budgets",
                json={"agent_run_label": "argo/x", "total_usd_cap": 5, "expires_in": "1h"},
                headers=auth,
            ),
            "patch": client.patch(
                f"/vault/keys/{key['key_id']}",
                json={"daily_usd_cap": 1, "reason": "x"},
                headers=auth,
            ),
        }
        listed = client.get("/vault/keys", params={"status": "active"}, headers=auth).json()
        revoked = client.post(
            "/vault/keys/revoke",
            json={"agent_run_label": key["agent_run_label"], "reason": "reaper: test"},
            headers=auth,
        ).json()
        again = client.post(
            "/vault/keys/revoke", json={"agent_run_label": key["agent_run_label"]}, headers=auth
        ).json()
        recorded = events(client, action="label.revoke")
    for what, response in refused.items():
        assert response.status_code == 403, what
        assert response.json()["error"]["code"] == "may_issue", what
    assert [k["key_id"] for k in listed["data"]] == [key["key_id"]]
    assert revoked["revoked"] == 1 and again["revoked"] == 0
    assert [e["outcome"] for e in recorded] == ["unchanged", "ok"]  # newest first
    assert recorded[1]["detail"]["revoked_keys"] == [key["key_id"]]
    assert recorded[1]["detail"]["reason"] == "reaper: test"


def test_an_issuers_patch_stays_within_its_maxima(tmp_path: Path) -> None:
    with app_client(tmp_path, Clock(NOW)) as client:
        issuer = create_issuer(client, **PAYMENTS)
        auth = bearer(issuer["issuer_token"])
        key = client.post("/vault/keys", json=key_body(), headers=auth).json()
        path = f"/vault/keys/{key['key_id']}"
        raise_too_far = client.patch(path, json={"daily_usd_cap": 101, "reason": "x"}, headers=auth)
        extend_too_far = client.patch(path, json={"expires_in": "7h", "reason": "x"}, headers=auth)
        within = client.patch(path, json={"daily_usd_cap": 100, "reason": "busy day"}, headers=auth)
        admin_can = client.patch(path, json={"daily_usd_cap": 1000, "reason": "ops"})
    assert raise_too_far.json()["error"].get("code") == "max_daily_usd_cap", raise_too_far.text
    assert extend_too_far.json()["error"]["code"] == "max_expires_in"
    assert within.status_code == 200 and admin_can.status_code == 200


def test_an_idempotent_issue_replaces_the_earlier_key(tmp_path: Path) -> None:
    with app_client(tmp_path, Clock(NOW)) as client:
        issuer = create_issuer(client, **{**PAYMENTS, "max_active_keys": 1})
        auth = {**bearer(issuer["issuer_token"]), "Idempotency-Key": "wf-uid-1/issue"}
        first = client.post("/vault/keys", json=key_body(), headers=auth)
        second = client.post("/vault/keys", json=key_body(), headers=auth)  # the step's retry
        changed = client.post("/vault/keys", json=key_body(daily_usd_cap=20), headers=auth)
        keys = client.get("/vault/keys").json()["data"]
        recorded = events(client, action="key.issue")
    assert first.status_code == second.status_code == 201  # the limit of 1 is not in the way
    assert second.headers["Keybrake-Replaced"] == first.json()["key_id"]
    assert second.json()["vault_key"] != first.json()["vault_key"]
    assert {k["key_id"]: k["status"] for k in keys} == {
        first.json()["key_id"]: "revoked",
        second.json()["key_id"]: "active",
    }
    assert changed.status_code == 400 and changed.json()["error"]["type"] == "idempotency_error"
    assert [e["outcome"].split(":")[0] for e in recorded] == ["refused", "ok", "ok"]


async def _race(
    proxy: ProxyProcess | ServedProxy, token: str, count: int, **headers: str
) -> Counter[int]:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as client:

        async def one(index: int) -> int:
            response = await client.post(
                "/vault/keys",
                json=key_body(agent_run_label=f"argo/payments-race-{index % 3}")
                if not headers
                else key_body(),
                headers={**bearer(token), **headers},
            )
            return response.status_code

        return Counter(await asyncio.gather(*(one(i) for i in range(count))))


def _issuer_on(proxy: ProxyProcess | ServedProxy, **spec: Any) -> dict[str, Any]:
    with proxy.admin() as admin:
        response = admin.post("/vault/issuers", json={**PAYMENTS, **spec})
    assert response.status_code == 201, response.text
    return dict(response.json())


def _active(proxy: ProxyProcess | ServedProxy) -> list[dict[str, Any]]:
    with proxy.admin() as admin:
        return list(admin.get("/vault/keys", params={"status": "active"}).json()["data"])


@pytest.mark.postgres
def test_the_active_key_limit_and_idempotent_issues_are_exact_across_replicas(
    tmp_path: Path, pg_url: str
) -> None:
    for i in range(2):
        (tmp_path / str(i)).mkdir()
    procs = [serve_proxy(tmp_path / str(i), database_url=pg_url) for i in range(2)]
    try:
        issuer = _issuer_on(procs[0], max_active_keys=5)

        async def both(**headers: str) -> Counter[int]:
            counts = await asyncio.gather(
                *(_race(p, issuer["issuer_token"], 20, **headers) for p in procs)
            )
            return counts[0] + counts[1]

        limited = asyncio.run(both())
        first = _active(procs[0])
        for key in first:
            with procs[0].admin() as admin:
                admin.delete(f"/vault/keys/{key['key_id']}")
        retried = asyncio.run(both(**{"Idempotency-Key": "wf-uid-7/issue-vault-key"}))
        after = _active(procs[1])
    finally:
        stop_all(procs)
    assert limited == {201: 5, 403: 35} and len(first) == 5
    # 40 attempts of one issue step, on two replicas at once: one live key at the end.
    assert retried == {201: 40}
    assert len(after) == 1


def test_events_page_back_and_forth(tmp_path: Path) -> None:
    with app_client(tmp_path, Clock(NOW)) as client:
        for n in range(5):
            client.post("/vault/issuers", json={**PAYMENTS, "name": f"team-{n}"})
        every = [e["id"] for e in events(client)]
        newest = [e["id"] for e in events(client, limit="2")]
        older = [e["id"] for e in events(client, limit="2", before_id=str(newest[-1]))]
        newer = [e["id"] for e in events(client, after_id=str(older[-1]))]
        bad = client.get("/vault/events", params={"before_id": "x"})
    assert len(every) == 5 and every == sorted(every, reverse=True)  # newest first
    assert newest == every[:2] and older == every[2:4]  # paging back
    assert newer == every[:3]  # what came after a known event
    assert bad.status_code == 400


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The in-process app's database: SQLite (its default) or PostgreSQL, as new."""
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("pg_url")}


# Bounded in any 24 hours only: no total maximum, no longest life.
DAILY_ONLY = {"name": "daily", "label_prefix": "argo/payments-", "max_daily_usd_cap": 100}


def hundred_dollar_intents() -> StubUpstream:
    """A Stripe stand-in that answers every intent as a $100 one."""
    return StubUpstream(
        UpstreamResponse(
            200,
            [("content-type", "application/json"), ("request-id", "req_stub")],
            b'{"id": "pi_stub", "object": "payment_intent", "amount": 10000, "currency": "usd"}',
        )
    )


def spend(client: TestClient, vault_key: str, calls: int) -> list[int]:
    """`calls` $100 intents, one after another, in the same minute: their statuses."""
    statuses = []
    for n in range(calls):
        response = client.post(
            "/stripe/v1/payment_intents",
            content=f"amount=10000&currency=usd&metadata[n]={n}".encode(),
            headers={**bearer(vault_key), "Content-Type": "application/x-www-form-urlencoded"},
        )
        statuses.append(response.status_code)
    return statuses


def test_an_issuers_key_patch_cannot_lift_its_24_hour_bound(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    """$100 in any 24 hours: a $1,000-total key is refused at issue, so a $100-total key patched
    to $1,000 must be refused too, and the key still moves no more than $100 in a minute."""
    upstream = hundred_dollar_intents()
    with app_client(tmp_path, Clock(NOW), upstream=upstream, **backend) as client:
        auth = bearer(create_issuer(client, **DAILY_ONLY)["issuer_token"])
        wide = client.post(
            "/vault/keys", json=key_body(daily_usd_cap=None, total_usd_cap=1000), headers=auth
        )
        key = client.post(
            "/vault/keys",
            json=key_body(daily_usd_cap=None, total_usd_cap=100, dedupe_window="0"),
            headers=auth,
        ).json()
        path = f"/vault/keys/{key['key_id']}"
        lifted = client.patch(path, json={"total_usd_cap": 1000, "reason": "x"}, headers=auth)
        stored = client.get(path).json()
        statuses = spend(client, key["vault_key"], 5)
    assert wide.status_code == 403 and wide.json()["error"]["code"] == "max_daily_usd_cap"
    assert lifted.status_code == 403, lifted.text
    assert lifted.json()["error"]["code"] == "max_daily_usd_cap"
    assert (stored["daily_usd_cap"], stored["total_usd_cap"], stored["changes"]) == (
        None,
        "100.00",
        [],
    )
    assert statuses == [200, 429, 429, 429, 429]
    assert len(upstream.sent) == 1  # $100 reached Stripe, not $500


def test_an_issuers_budget_patch_cannot_lift_its_keys_24_hour_bound(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    """A key with no caps of its own is bounded by its budget's: raising the budget past the
    issuer's 24-hour maximum would lift the key's bound with it."""
    upstream = hundred_dollar_intents()
    with app_client(tmp_path, Clock(NOW), upstream=upstream, **backend) as client:
        auth = bearer(create_issuer(client, **DAILY_ONLY)["issuer_token"])
        run = {"agent_run_label": "argo/payments-run-1", "expires_in": "3h"}
        wide = client.post("/vault/budgets", json={**run, "total_usd_cap": 1000}, headers=auth)
        budget = client.post("/vault/budgets", json={**run, "total_usd_cap": 100}, headers=auth)
        assert budget.status_code == 201, budget.text
        budget_path = f"/vault/budgets/{budget.json()['budget_id']}"
        key = client.post(
            "/vault/keys",
            json=key_body(
                daily_usd_cap=None,
                total_usd_cap=None,
                budget_id=budget.json()["budget_id"],
                dedupe_window="0",
            ),
            headers=auth,
        )
        assert key.status_code == 201, key.text
        lifted = client.patch(
            budget_path, json={"total_usd_cap": 1000, "reason": "x"}, headers=auth
        )
        stored = client.get(budget_path).json()
        statuses = spend(client, key.json()["vault_key"], 5)
    assert wide.status_code == 403 and wide.json()["error"]["code"] == "max_daily_usd_cap"
    assert lifted.status_code == 403, lifted.text
    assert lifted.json()["error"]["code"] == "max_daily_usd_cap"
    assert (stored["daily_usd_cap"], stored["total_usd_cap"], stored["changes"]) == (
        None,
        "100.00",
        [],
    )
    assert statuses == [200, 429, 429, 429, 429]
    assert len(upstream.sent) == 1


def test_an_issuer_may_always_tighten_but_loosens_only_into_its_policy(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    """A key the admin issued in the issuer's scope, beyond its policy: the issuer may lower its
    cap or shorten its life, but anything that loosens it (here its life) must leave the whole
    key, as patched, within the policy."""
    with app_client(tmp_path, Clock(NOW), **backend) as client:
        auth = bearer(create_issuer(client, **DAILY_ONLY)["issuer_token"])
        key = client.post(
            "/vault/keys", json=key_body(daily_usd_cap=1000, total_usd_cap=None)
        ).json()  # the admin's
        path = f"/vault/keys/{key['key_id']}"
        lowered = client.patch(path, json={"daily_usd_cap": 500, "reason": "x"}, headers=auth)
        shortened = client.patch(path, json={"expires_in": "1h", "reason": "x"}, headers=auth)
        after_tightening = client.get(path).json()
        extended = client.patch(path, json={"expires_in": "90m", "reason": "x"}, headers=auth)
        after_refusal = client.get(path).json()
        into_policy = client.patch(
            path, json={"daily_usd_cap": 100, "expires_in": "90m", "reason": "x"}, headers=auth
        )
        admin_raises = client.patch(path, json={"daily_usd_cap": 1000, "reason": "ops"})
        final = client.get(path).json()
    assert lowered.status_code == 200, lowered.text
    assert shortened.status_code == 200, shortened.text
    assert after_tightening["daily_usd_cap"] == "500.00"
    assert after_tightening["expires_at"] == "2026-11-26T13:00:00.000000Z"
    # Only its life was patched, but the key it leaves is still $500 a day: refused.
    assert extended.status_code == 403, extended.text
    assert extended.json()["error"]["code"] == "max_daily_usd_cap"
    assert after_refusal == after_tightening
    assert into_policy.status_code == 200, into_policy.text
    assert admin_raises.status_code == 200  # the admin is unrestricted
    assert (final["daily_usd_cap"], final["expires_at"]) == (
        "1000.00",
        "2026-11-26T13:30:00.000000Z",
    )


def test_a_budget_shows_an_issuer_only_the_keys_in_its_scope(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    with app_client(tmp_path, Clock(NOW), **backend) as client:
        auth = bearer(create_issuer(client, **PAYMENTS)["issuer_token"])
        budget = client.post(
            "/vault/budgets",
            json={
                "agent_run_label": "argo/payments-run-1",
                "total_usd_cap": 100,
                "expires_in": "3h",
            },
            headers=auth,
        ).json()
        on_budget = {"daily_usd_cap": None, "total_usd_cap": None, "expires_in": None}
        mine = client.post(
            "/vault/keys", json=key_body(**on_budget, budget_id=budget["budget_id"]), headers=auth
        ).json()
        # The admin's key on the same budget, under a label outside the issuer's scope.
        theirs = client.post(
            "/vault/keys",
            json=key_body(
                **on_budget, budget_id=budget["budget_id"], agent_run_label="argo/growth-run-9"
            ),
        ).json()
        path = f"/vault/budgets/{budget['budget_id']}"
        shown = {
            "get": client.get(path, headers=auth).json(),
            "list": client.get("/vault/budgets", headers=auth).json()["data"][0],
            "patch": client.patch(
                path, json={"total_usd_cap": 90, "reason": "x"}, headers=auth
            ).json(),
            "revoke": client.delete(path, headers=auth).json(),
        }
        admin_sees = client.get(path).json()
    for how, view in shown.items():
        assert view["budget_id"] == budget["budget_id"], how
        assert view["keys"] == [mine["key_id"]], how
    assert sorted(admin_sees["keys"]) == sorted([mine["key_id"], theirs["key_id"]])
