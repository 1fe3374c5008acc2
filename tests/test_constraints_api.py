"""Constraints on keys and budgets, from the admin API to the store and back: stored on both
backends and read by the request path with the budget's (`find_key`), shown canonical, refused
with a 400 naming the entry when malformed, bound by an issuer's policy (inherited, or within it,
else a 403 naming the field), part of an idempotent issue, and given from the CLI. What a call
outside them gets is tests/test_constraints*.py's (the request path)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from keybrake.cli._options import constraints as constraint_options
from keybrake.cli._render import constraints_text
from keybrake.proxy.access import Actor
from keybrake.proxy.constraints import Constraints
from keybrake.proxy.models import KeyCreate
from keybrake.proxy.store.records import BudgetRecord, Listing
from tests import test_store
from tests.helpers import TEST_EVENT
from tests.inproc import Clock, app_client, issue
from tests.served import ServedProxy
from tests.test_cli import ISSUE, run
from tests.test_issuers import bearer, create_issuer, events, key_body

database_url = test_store.database_url  # sqlite and postgres, as the store tests run

STRIPE = {"currencies": ["usd"], "customers": ["cus_A", "cus_B"]}
ISSUER = {
    "name": "payments",
    "label_prefix": "argo/payments-",
    "constraints": {**STRIPE, "recipients": ["+4420*"]},
}


# -- the store ---------------------------------------------------------------------------------


def test_constraints_round_trip_and_find_key_reads_the_budgets(database_url: str) -> None:
    key_constraints = Constraints(customers=("cus_A",))
    budget_constraints = Constraints(mode="report", recipients=("+4420*",), currencies=("usd",))

    async def run() -> None:
        store = await test_store.opened(database_url)
        try:
            now = test_store.NOW
            budget = BudgetRecord(
                budget_id="bg_00000000000000c1",
                label="argo/store",
                daily_cap_micros=None,
                total_cap_micros=5_000_000,
                metadata={},
                created_at=now,
                expires_at=now + timedelta(hours=2),
                constraints=budget_constraints,
            )
            await store.create_budget(budget, TEST_EVENT)
            on_budget = replace(
                test_store.key(1_000_000),
                budget_id=budget.budget_id,
                constraints=key_constraints,
            )
            await store.create_key(on_budget, TEST_EVENT)
            bare = replace(test_store.key(1_000_000), key_id="vk_bare", key_hash=b"b" * 32)
            await store.create_key(bare, TEST_EVENT)

            found = await store.find_key(on_budget.key_hash)
            assert found is not None
            assert found.constraints == key_constraints
            assert found.budget_constraints == budget_constraints
            assert found == replace(on_budget, budget_constraints=budget_constraints)
            alone = await store.find_key(bare.key_hash)
            assert alone is not None
            assert alone.constraints is None and alone.budget_constraints is None
            # Only the request path's read carries the budget's.
            view = await store.get_key(on_budget.key_id, now)
            assert view is not None and view.key == on_budget
            drawn = await store.get_budget(budget.budget_id, now)
            assert drawn is not None and drawn.budget.constraints == budget_constraints
            listed = await store.list_budgets(Listing(), now)
            assert [b.budget.constraints for b in listed] == [budget_constraints]
        finally:
            await store.close()

    asyncio.run(run())


# -- the admin API -----------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with app_client(tmp_path, Clock(), resend_api_key="re_real") as client:
        yield client


def test_a_key_and_a_budget_keep_their_constraints_canonical(client: TestClient) -> None:
    key = issue(
        client,
        constraints={"customers": ["cus_B", "cus_A", "cus_B"], "currencies": [" USD "]},
    )
    canonical = {"mode": "enforce", "currencies": ["usd"], "customers": ["cus_A", "cus_B"]}
    assert key["constraints"] == canonical
    assert client.get(f"/vault/keys/{key['key_id']}").json()["constraints"] == canonical
    assert client.get("/vault/keys").json()["data"][0]["constraints"] == canonical

    budget = client.post(
        "/vault/budgets",
        json={
            "agent_run_label": "argo/billing-agent-x7k2p",
            "total_usd_cap": 50,
            "constraints": {"mode": "report", "recipient_domains": ["Example.COM"], **STRIPE},
        },
    )
    assert budget.status_code == 201, budget.text
    shown = {"mode": "report", **STRIPE, "recipient_domains": ["example.com"]}
    assert budget.json()["constraints"] == shown
    budget_id = budget.json()["budget_id"]
    assert client.get(f"/vault/budgets/{budget_id}").json()["constraints"] == shown
    on_it = issue(client, budget_id=budget_id, expires_in="30m")
    assert on_it["constraints"] is None  # its own; the budget's bind it too, on the request path

    recorded = events(client, action="key.issue")[-1]  # oldest last: the first key's
    assert recorded["detail"]["constraints"] == canonical
    assert "constraints_inherited" not in recorded["detail"]


def _key(**spec: Any) -> dict[str, Any]:
    return {
        "vendor": "stripe",
        "daily_usd_cap": 3,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "agent_run_label": "argo/x",
        **spec,
    }


@pytest.mark.parametrize(
    "path,body,message",
    [
        (
            "/vault/keys",
            _key(constraints={"payees": ["x"]}),
            "constraints: unknown field 'payees'",
        ),
        (
            "/vault/keys",
            _key(constraints={"customers": ["bob"]}),
            "constraints.customers: 'bob' is not a Stripe customer id",
        ),
        (
            "/vault/keys",
            _key(constraints={"recipients": ["+4420*"]}),
            "constraints.recipients: not a stripe constraint (currencies, customers, "
            "destinations are)",
        ),
        ("/vault/keys", _key(constraints={}), "constraints: constrain at least one of"),
        (
            "/vault/keys",
            _key(constraints={"mode": "audit", "currencies": ["usd"]}),
            "constraints.mode: enforce or report",
        ),
        ("/vault/keys", _key(constraints=["usd"]), "constraints: Input should be a valid dict"),
        (
            "/vault/keys",
            _key(constraints={"currencies": "usd"}),
            "constraints.currencies: a list of strings",
        ),
        (
            "/vault/budgets",
            {"agent_run_label": "argo/x", "total_usd_cap": 5, "constraints": {"senders": ["@"]}},
            "constraints.senders:",
        ),
        (
            "/vault/issuers",
            {**ISSUER, "constraints": {"recipient_domains": ["not a domain"]}},
            "constraints.recipient_domains: 'not a domain' is not a domain name",
        ),
    ],
)
def test_malformed_constraints_are_a_400_naming_the_entry(
    client: TestClient, path: str, body: dict[str, Any], message: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(message), error["message"]


# -- an issuer's constraints -------------------------------------------------------------------


def test_an_issuers_constraints_are_inherited_by_what_it_issues_without_its_own(
    client: TestClient,
) -> None:
    issuer = create_issuer(client, **ISSUER)
    inherited = {"mode": "enforce", **STRIPE, "recipients": ["+4420*"]}
    assert issuer["constraints"] == inherited
    assert client.get(f"/vault/issuers/{issuer['issuer_id']}").json()["constraints"] == inherited
    token = bearer(issuer["issuer_token"])

    key = client.post("/vault/keys", json=key_body(), headers=token)
    assert key.status_code == 201, key.text
    # A key gets its vendor's fields: a Stripe key is not held to Twilio recipients.
    assert key.json()["constraints"] == {"mode": "enforce", **STRIPE}
    recorded = events(client, action="key.issue")[0]
    assert recorded["detail"]["constraints"] == {"mode": "enforce", **STRIPE}
    assert recorded["detail"]["constraints_inherited"] is True

    # None of them applies to Resend: its key is unconstrained.
    resend = key_body(vendor="resend", allowed_endpoints=["POST /emails"])
    unbound = client.post("/vault/keys", json=resend, headers=token)
    assert unbound.status_code == 201, unbound.text
    assert unbound.json()["constraints"] is None

    budget = client.post(
        "/vault/budgets",
        json={"agent_run_label": "argo/payments-run-1", "total_usd_cap": 10},
        headers=token,
    )
    assert budget.status_code == 201, budget.text
    assert budget.json()["constraints"] == inherited  # a budget's keys may be of any vendor

    # The admin token is bound by no issuer.
    assert issue(client, agent_run_label="argo/payments-run-2")["constraints"] is None
    assert client.get("/vault/issuers").json()["data"][0]["constraints"] == inherited


def test_an_issuers_key_or_budget_with_its_own_constraints_lies_within_its_issuers(
    client: TestClient,
) -> None:
    issuer = create_issuer(client, **ISSUER)
    token = bearer(issuer["issuer_token"])

    narrower = {"currencies": ["usd"], "customers": ["cus_A"]}
    within = client.post("/vault/keys", json=key_body(constraints=narrower), headers=token)
    assert within.status_code == 201, within.text
    assert within.json()["constraints"] == {"mode": "enforce", **narrower}
    recorded = events(client, action="key.issue")[0]
    assert "constraints_inherited" not in recorded["detail"]

    for own, field, allowed in [
        ({"currencies": ["usd"], "customers": ["cus_C"]}, "customers", "cus_A, cus_B"),
        ({"customers": ["cus_A"]}, "currencies", "usd"),  # left unconstrained: wider
        ({"mode": "report", **STRIPE}, "mode", "enforce"),
    ]:
        refused = client.post("/vault/keys", json=key_body(constraints=own), headers=token)
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["code"] == "constraints"
        assert error["message"] == (
            f"constraints.{field}: not within this issuer's constraints ({field}: {allowed})"
        )

    budget = {"agent_run_label": "argo/payments-run-1", "total_usd_cap": 10}
    wider = {**STRIPE, "recipients": ["+44*"]}  # a shorter prefix admits more numbers
    refused = client.post("/vault/budgets", json={**budget, "constraints": wider}, headers=token)
    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("constraints.recipients: not within")
    inside = {**STRIPE, "recipients": ["+442071*"]}
    created = client.post("/vault/budgets", json={**budget, "constraints": inside}, headers=token)
    assert created.status_code == 201, created.text
    assert [e["outcome"].split(":")[0] for e in events(client, action="budget.create")] == [
        "ok",
        "refused",
    ]


def test_an_issuer_without_constraints_binds_none(client: TestClient) -> None:
    issuer = create_issuer(client, name="open", label_prefix="argo/payments-")
    assert issuer["constraints"] is None
    own = {"mode": "report", "customers": ["cus_Z"]}
    key = client.post(
        "/vault/keys", json=key_body(constraints=own), headers=bearer(issuer["issuer_token"])
    )
    assert key.status_code == 201, key.text
    assert key.json()["constraints"] == own


# -- idempotent issue --------------------------------------------------------------------------


def test_constraints_are_part_of_an_idempotent_issue(client: TestClient) -> None:
    auth = {"Idempotency-Key": "wf-uid-1/issue"}
    first = client.post("/vault/keys", json=_key(constraints=STRIPE), headers=auth)
    again = client.post("/vault/keys", json=_key(constraints=STRIPE), headers=auth)
    other = client.post("/vault/keys", json=_key(constraints={"currencies": ["eur"]}), headers=auth)
    unconstrained = client.post("/vault/keys", json=_key(), headers=auth)
    assert first.status_code == again.status_code == 201
    assert again.headers["Keybrake-Replaced"] == first.json()["key_id"]
    for refused in (other, unconstrained):
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "idempotency_error"


def test_an_issue_without_constraints_hashes_as_before_they_existed() -> None:
    """A retry straddling the upgrade that added `constraints` is still the same request."""
    from keybrake.proxy.vault import _issue_request

    spec = KeyCreate.model_validate(_key())
    request = _issue_request(Actor(), "k", spec)
    assert request is not None
    before = spec.model_dump_json(exclude={"constraints"}).encode()
    assert request.request_hash == hashlib.sha256(before).hexdigest()
    constrained = KeyCreate.model_validate(_key(constraints=STRIPE))
    other = _issue_request(Actor(), "k", constrained)
    assert other is not None and other.request_hash != request.request_hash


# -- the CLI -----------------------------------------------------------------------------------


def test_constraint_flags_are_the_apis_constraints() -> None:
    assert constraint_options(None, None) is None
    given = ["currencies=usd", "customers=cus_1, cus_2", "customers=cus_3"]
    assert constraint_options(given, None) == {
        "currencies": ["usd"],
        "customers": ["cus_1", "cus_2", "cus_3"],
    }
    assert constraint_options(["recipients=+4420*"], "report") == {
        "mode": "report",
        "recipients": ["+4420*"],
    }
    shown = constraints_text({"mode": "report", "customers": ["cus_1", "cus_2"]})
    assert shown == "customers: cus_1, cus_2\nreport only: calls outside are forwarded and audited"
    assert constraints_text(None) == "-" and constraints_text(None, none="none") == "none"


def test_constraints_from_the_cli(bare_proxy: ServedProxy) -> None:
    proxy = bare_proxy
    flags = ["--constraint", "currencies=usd", "--constraint", "customers=cus_1,cus_2"]
    code, out, err = run(proxy, *ISSUE, *flags, "-o", "json")
    assert code == 0, err
    key_id = json.loads(out)["key_id"]
    code, out, _ = run(proxy, "keys", "show", key_id, "-o", "table")
    assert code == 0 and "Constraints" in out
    assert "currencies: usd" in out and "customers: cus_1, cus_2" in out

    budget = "budgets create --label argo/billing-agent-x7k2p --total-usd-cap 50 -q"
    report = ["--constraint", "recipient_domains=example.com", "--constraint-mode", "report"]
    code, out, err = run(proxy, *budget.split(), *report)
    assert code == 0, err
    code, out, _ = run(proxy, "budgets", "show", out.strip(), "-o", "table")
    assert "recipient_domains: example.com" in out and "report only" in out

    issuer_args = "issuers create --name payments --label-prefix argo/payments- -o json"
    code, out, err = run(proxy, *issuer_args.split(), "--constraint", "customers=cus_1")
    assert code == 0, err
    issuer = json.loads(out)
    assert issuer["constraints"] == {"mode": "enforce", "customers": ["cus_1"]}
    code, out, _ = run(proxy, "issuers", "show", issuer["issuer_id"], "-o", "table")
    assert "customers: cus_1" in out
    code, out, _ = run(proxy, "issuers", "list", "-o", "json")
    assert json.loads(out)[0]["constraints"] == issuer["constraints"]


def test_constraints_with_a_call_rate_show_in_a_table() -> None:
    shown = constraints_text(
        {"mode": "enforce", "customers": ["cus_1"], "max_calls_per_minute": 60}
    )
    assert shown == "customers: cus_1\nmax_calls_per_minute: 60"
