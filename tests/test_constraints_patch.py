"""Patching a key's or budget's constraints (call rate included), from the admin API and the CLI
to every replica's next call: replaced as a whole (`{}` removes them), held to an issuer's
constraints as at issue (403 naming the field, nothing changed), recorded as a change, and
judged by on the next call of a replica that cached the old ones (rule 0 of
`keybrake.proxy.decisions`), on both backends. The random sequences of tests/model patch them
too, from another replica."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from keybrake.proxy.decisions import Decision
from keybrake.proxy.store import open_store
from keybrake.proxy.store.protocol import Store
from keybrake.proxy.store.records import Patch, Reservation
from tests import test_store
from tests.helpers import TEST_EVENT
from tests.inproc import Clock, StubUpstream, app_client, issue
from tests.served import ServedProxy
from tests.test_cli import ISSUE, run
from tests.test_issuers import PAYMENTS, bearer, create_issuer, events, key_body
from tests.test_velocity import audit, charge

database_url = test_store.database_url  # sqlite and postgres, as the store tests run

USD = {"currencies": ["usd"]}
EUR = {"currencies": ["eur"]}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with app_client(tmp_path, Clock(), upstream=StubUpstream()) as client:
        yield client


def patch(client: TestClient, subject: str, headers: Any = None, **body: Any) -> httpx.Response:
    kind = "budgets" if subject.startswith("bg_") else "keys"
    response: httpx.Response = client.patch(
        f"/vault/{kind}/{subject}", json={"reason": "the run's customers", **body}, headers=headers
    )
    return response


# -- the admin API ---------------------------------------------------------------------------


def test_a_patch_replaces_a_keys_constraints_whole_and_records_the_change(
    client: TestClient,
) -> None:
    key = issue(client, constraints={**USD, "max_calls_per_minute": 5})
    patched = patch(client, key["key_id"], constraints={**EUR, "customers": ["cus_B", "cus_A"]})
    assert patched.status_code == 200, patched.text
    canonical = {"mode": "enforce", "currencies": ["eur"], "customers": ["cus_A", "cus_B"]}
    assert patched.json()["constraints"] == canonical  # the rate went with the rest
    assert client.get(f"/vault/keys/{key['key_id']}").json()["constraints"] == canonical
    change = patched.json()["changes"][-1]
    assert change["field"] == "constraints"
    assert json.loads(change["old"]) == {**key["constraints"], "max_calls_per_minute": 5}
    assert json.loads(change["new"]) == canonical
    assert events(client, action="key.patch")[0]["detail"]["constraints"] == canonical

    removed = patch(client, key["key_id"], constraints={})
    assert removed.status_code == 200, removed.text
    assert removed.json()["constraints"] is None
    assert removed.json()["changes"][-1]["new"] is None

    # A caps patch leaves them as they are (it names none).
    patch(client, key["key_id"], constraints=USD)
    capped = patch(client, key["key_id"], daily_usd_cap="200")
    assert capped.json()["constraints"] == {"mode": "enforce", **USD}


def test_a_budget_takes_any_vendors_fields_and_a_key_only_its_own(client: TestClient) -> None:
    budget = client.post(
        "/vault/budgets", json={"agent_run_label": "argo/run", "total_usd_cap": 10}
    ).json()
    both = {"currencies": ["usd"], "recipients": ["+4420*"], "mode": "report"}
    patched = patch(client, budget["budget_id"], constraints=both)
    assert patched.status_code == 200, patched.text
    assert patched.json()["constraints"] == {"mode": "report", **both}

    key = issue(client)
    before = client.get(f"/vault/keys/{key['key_id']}").json()
    for constraints, message in [
        ({"recipients": ["+4420*"]}, "constraints.recipients: not a stripe constraint"),
        ({"currencies": ["not money"]}, "constraints.currencies:"),
        ({"max_calls_per_minute": 0}, "constraints.max_calls_per_minute: a whole number"),
        ({"mode": "report"}, "constraints: constrain at least one of"),
    ]:
        refused = patch(client, key["key_id"], constraints=constraints)
        assert refused.status_code == 400, refused.text
        assert message in refused.json()["error"]["message"], refused.text
    assert client.get(f"/vault/keys/{key['key_id']}").json() == before  # nothing changed


def test_an_issuers_patch_lies_within_its_constraints(tmp_path: Path) -> None:
    issuer_constraints = {"currencies": ["usd"], "customers": ["cus_A", "cus_B"]}
    with app_client(tmp_path, Clock(), upstream=StubUpstream()) as client:
        issuer = create_issuer(
            client, name="payments", label_prefix="argo/payments-", constraints=issuer_constraints
        )
        token = bearer(issuer["issuer_token"])
        key = client.post("/vault/keys", json=key_body(), headers=token).json()
        assert key["constraints"] == {"mode": "enforce", **issuer_constraints}  # inherited

        narrower = {"currencies": ["usd"], "customers": ["cus_A"]}
        patched = patch(client, key["key_id"], token, constraints=narrower)
        assert patched.status_code == 200, patched.text
        assert patched.json()["constraints"] == {"mode": "enforce", **narrower}

        for own, field in [
            ({"currencies": ["usd"], "customers": ["cus_C"]}, "customers"),
            ({"customers": ["cus_A"]}, "currencies"),  # left unconstrained: wider
            ({"mode": "report", **issuer_constraints}, "mode"),
        ]:
            refused = patch(client, key["key_id"], token, constraints=own)
            assert refused.status_code == 403, refused.text
            message = refused.json()["error"]["message"]
            assert message.startswith("this patch loosens the key"), message
            assert f"constraints.{field}: not within this issuer's constraints" in message
        shown = client.get(f"/vault/keys/{key['key_id']}").json()
        assert shown["constraints"] == {"mode": "enforce", **narrower}  # nothing changed

        # Without its own, it holds the issuer's again (as one issued without any).
        reset = patch(client, key["key_id"], token, constraints={})
        assert reset.status_code == 200, reset.text
        assert reset.json()["constraints"] == {"mode": "enforce", **issuer_constraints}
        # The admin is bound by no issuer.
        admin = patch(client, key["key_id"], constraints={"currencies": ["eur"]})
        assert admin.status_code == 200, admin.text


def test_an_issuer_widens_constraints_only_into_its_policy(tmp_path: Path) -> None:
    """Widening or removing constraints is a loosening, as raising a cap is: an issuer may do it
    only on a key or budget that then lies within everything its policy asks at issue. One the
    admin issued in its scope beyond that policy (a larger cap, another vendor) keeps them, while
    narrowing them stays allowed."""
    with app_client(tmp_path, Clock(), upstream=StubUpstream(), resend_api_key="re_x") as client:
        issuer = create_issuer(client, **PAYMENTS)  # Stripe only, at most $100 a day
        token = bearer(issuer["issuer_token"])
        label = {"agent_run_label": "argo/payments-run-9"}
        beyond = issue(client, daily_usd_cap=1000, constraints={"customers": ["cus_A"]}, **label)
        other_vendor = issue(
            client,
            vendor="resend",
            allowed_endpoints=["POST /emails"],
            daily_usd_cap=10,
            constraints={"recipient_domains": ["example.com"]},
            **label,
        )
        for key, code in ((beyond, "max_daily_usd_cap"), (other_vendor, "allowed_vendors")):
            for wider in (
                {},
                {**key["constraints"], "mode": "report"},
                {"max_calls_per_minute": 9},
            ):
                refused = patch(client, key["key_id"], token, constraints=wider)
                assert refused.status_code == 403, (wider, refused.text)
                assert refused.json()["error"]["code"] == code, refused.text
            shown = client.get(f"/vault/keys/{key['key_id']}").json()["constraints"]
            assert shown == key["constraints"]  # nothing changed
        narrower = {"customers": ["cus_A"], "currencies": ["usd"]}
        assert patch(client, beyond["key_id"], token, constraints=narrower).status_code == 200
        # Its own key, within its policy: widening is allowed.
        own = client.post(
            "/vault/keys", json=key_body(constraints={"customers": ["cus_A"]}), headers=token
        ).json()
        assert patch(client, own["key_id"], token, constraints={}).status_code == 200


def test_an_issuer_loosens_a_key_only_into_its_constraints_and_may_always_narrow(
    tmp_path: Path,
) -> None:
    """A key the admin issued in an issuer's scope outside the issuer's constraints: the issuer
    may not raise its cap (the key as patched must lie within the whole policy, its constraints
    included: a cap raised on a key that pays anyone moves more to anyone), and may narrow it."""
    bound = {"customers": ["cus_A"]}
    with app_client(tmp_path, Clock(), upstream=StubUpstream()) as client:
        issuer = create_issuer(
            client, name="payments", label_prefix="argo/payments-", constraints=bound
        )
        token = bearer(issuer["issuer_token"])
        label = {"agent_run_label": "argo/payments-run-9"}
        anyone = issue(client, daily_usd_cap=10, **label)
        raised = patch(client, anyone["key_id"], token, daily_usd_cap="90")
        assert raised.status_code == 403, raised.text
        assert "constraints.customers: not within" in raised.json()["error"]["message"]
        assert client.get(f"/vault/keys/{anyone['key_id']}").json()["daily_usd_cap"] == "10.00"
        wider = issue(client, constraints={"customers": ["cus_A", "cus_B"]}, **label)
        narrowed = patch(client, wider["key_id"], token, constraints={"customers": ["cus_B"]})
        assert narrowed.status_code == 200, narrowed.text


def test_null_constraints_change_nothing_as_every_null_field_of_a_patch(
    client: TestClient,
) -> None:
    """A client that sends its whole patch model, unset fields as null, must not strip the
    constraints of a key whose cap it changes: only `{}` removes them."""
    key = issue(client, constraints=USD)
    patched = patch(client, key["key_id"], daily_usd_cap="50", total_usd_cap=None, constraints=None)
    assert patched.status_code == 200, patched.text
    assert patched.json()["constraints"] == {"mode": "enforce", **USD}
    alone = patch(client, key["key_id"], constraints=None)
    assert alone.status_code == 400, alone.text  # it changes nothing at all
    assert "constraints" in alone.json()["error"]["message"]


def test_a_revoked_key_takes_no_patch_of_constraints(client: TestClient) -> None:
    key = issue(client, constraints=USD)
    assert client.delete(f"/vault/keys/{key['key_id']}").status_code == 200
    refused = patch(client, key["key_id"], constraints=EUR)
    assert refused.status_code == 409, refused.text
    assert client.get(f"/vault/keys/{key['key_id']}").json()["constraints"]["currencies"] == ["usd"]


# -- every replica's next call -----------------------------------------------------------------


def test_the_next_call_on_another_replica_is_judged_by_the_patched_constraints(
    tmp_path: Path, database_url: str
) -> None:
    """Two replicas on one database: the one serving the calls cached the key's constraints
    (and its budget's) at its first call; the other patches them."""
    clock, vendor = Clock(), StubUpstream()
    settings = {"database_url": database_url, "upstream": vendor}
    with (
        app_client(tmp_path, clock, **settings) as serving,
        app_client(tmp_path, clock, **settings) as other,
    ):
        budget = other.post(
            "/vault/budgets",
            json={"agent_run_label": "argo/run", "total_usd_cap": 50, "expires_in": "3h"},
        ).json()
        key = issue(other, constraints=USD, budget_id=budget["budget_id"])
        vault = key["vault_key"]
        assert charge(serving, vault).status_code == 200  # usd: forwarded, and cached

        assert patch(other, key["key_id"], constraints=EUR).status_code == 200
        refused = charge(serving, vault)  # narrower: refused at once
        assert refused.status_code == 403, refused.text
        assert "currencies: 'usd' is not allowed" in refused.json()["error"]["message"]

        assert patch(other, key["key_id"], constraints={}).status_code == 200
        assert charge(serving, vault).status_code == 200  # wider: forwarded at once

        # The budget's, read with the key's by the serving replica.
        assert patch(other, budget["budget_id"], constraints=EUR).status_code == 200
        refused = charge(serving, vault)
        assert refused.status_code == 403
        assert "budget's constraints" in refused.json()["error"]["message"]
        assert patch(other, budget["budget_id"], constraints={}).status_code == 200

        # A call rate set by a patch counts from then on.
        limited = {"max_calls_per_minute": 1}
        assert patch(other, key["key_id"], constraints=limited).status_code == 200
        assert charge(serving, vault).status_code == 200
        over = charge(serving, vault)
        assert over.status_code == 429 and over.headers["X-Keybrake-Rate-Limited"] == "true"

        decisions = [row["decision"] for row in audit(other, key["key_id"])]
        assert decisions == [
            "forwarded",
            "constraint_violated",
            "forwarded",
            "constraint_violated",
            "forwarded",
            "rate_limited",
        ]
        assert "policy_changed" not in decisions  # judged again, never recorded as such
        assert len(vendor.sent) == 3


class _PatchingStore:
    """The store, whose reservations find the key's constraints patched just before them, as
    many times as `times` says (another replica patching while this one judged the call)."""

    def __init__(self, store: Store, times: int) -> None:
        self._store = store
        self.times = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def reserve(self, reservation: Reservation) -> Any:
        if self.times:
            self.times -= 1
            widened = Patch(reason="meanwhile", sets_policy=True)
            await self._store.patch(reservation.key.key_id, widened, reservation.now, TEST_EVENT)
        return await self._store.reserve(reservation)


@pytest.mark.parametrize("times", [1, 2])
def test_a_call_judged_by_old_constraints_is_judged_again_once(tmp_path: Path, times: int) -> None:
    store = _PatchingStore(open_store(f"sqlite:///{tmp_path / 'p.db'}"), times)
    vendor = StubUpstream()
    with app_client(tmp_path, Clock(), upstream=vendor, store=store) as client:
        store.times = 0
        key = issue(client, constraints=USD)
        store.times = times
        answer = charge(client, key["vault_key"])
        rows = audit(client, key["key_id"])
        if times == 1:  # judged again with the key read afresh: forwarded
            assert answer.status_code == 200, answer.text
            assert [row["decision"] for row in rows] == ["forwarded"]
            assert len(vendor.sent) == 1
        else:  # changed again meanwhile: refused, for the caller to retry
            assert answer.status_code == 409, answer.text
            assert answer.headers["X-Keybrake-Code"] == "keybrake_policy_changed"
            assert answer.headers["Retry-After"] == "1"  # (the pod helper sends it again)
            assert [row["decision"] for row in rows] == [Decision.POLICY_CHANGED]
            assert not vendor.sent


# -- the CLI -----------------------------------------------------------------------------------


def test_the_patch_commands_replace_or_remove_constraints(bare_proxy: ServedProxy) -> None:
    proxy = bare_proxy
    code, out, err = run(proxy, *ISSUE, "-o", "json")
    assert code == 0, err
    key_id = json.loads(out)["key_id"]
    code, out, err = run(
        proxy,
        *f"keys patch {key_id} --reason narrower -o json".split(),
        *["--constraint", "currencies=usd", "--constraint", "max_calls_per_minute=30"],
        *["--constraint-mode", "report"],
    )
    assert code == 0, err
    assert json.loads(out)["constraints"] == {
        "mode": "report",
        "currencies": ["usd"],
        "max_calls_per_minute": 30,
    }
    code, out, err = run(
        proxy, *f"keys patch {key_id} --reason none --no-constraints -o json".split()
    )
    assert code == 0, err
    assert json.loads(out)["constraints"] is None

    code, out, err = run(proxy, *"budgets create --label argo/run-2 --total-usd-cap 5 -q".split())
    assert code == 0, err
    budget_id = out.strip().removeprefix("budget/")
    code, out, err = run(
        proxy,
        *f"budgets patch {budget_id} --reason uk -o json".split(),
        *["--constraint", "recipients=+4420*"],
    )
    assert code == 0, err
    assert json.loads(out)["constraints"] == {"mode": "enforce", "recipients": ["+4420*"]}

    for flags, message in [
        (["--no-constraints", "--constraint", "currencies=usd"], "--no-constraints: give it or"),
        (["--constraint-mode", "report"], "--constraint-mode: give the constraints too"),
        (["--constraint", "recipients=+4420*"], "not a stripe constraint"),
    ]:
        code, _, err = run(proxy, *f"keys patch {key_id} --reason x".split(), *flags)
        assert code != 0 and message in err, (flags, err)
