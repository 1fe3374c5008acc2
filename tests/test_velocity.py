"""Call rates (`max_calls_per_minute`) and report-only policies, through the app in-process with
an injectable clock: what reaches the vendor, the 429 a pod waits on, and what a report-only
policy leaves in the audit log and the metrics."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from starlette.testclient import TestClient

from tests.inproc import Clock, StubUpstream, app_client, issue
from tests.proxyproc import ADMIN_KEY
from tests.test_dashboard import sign_in

INTENT = {"amount": "100", "currency": "usd"}
_calls = itertools.count()


def charge(client: TestClient, vault_key: str, **form: str) -> httpx.Response:
    """A PaymentIntent of its own (identical ones within the dedupe window would be replays)."""
    response: httpx.Response = client.post(
        "/stripe/v1/payment_intents",
        data={**INTENT, "description": f"call {next(_calls)}", **form},
        headers={"Authorization": f"Bearer {vault_key}"},
    )
    return response


def audit(client: TestClient, key_id: str) -> list[dict[str, Any]]:
    """The key's audit rows, oldest first."""
    rows = client.get("/vault/audit", params={"key_id": key_id}).json()["data"]
    return list(rows)[::-1]


def reports(client: TestClient, decision: str) -> float:
    text = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    found = re.search(
        rf'keybrake_policy_reports_total\{{decision="{decision}",vendor="stripe"\}} (\S+)', text
    )
    return float(found.group(1)) if found else 0.0


def test_a_full_rate_is_a_429_to_wait_on_never_a_cap_hit(tmp_path: Path) -> None:
    clock, vendor = Clock(), StubUpstream()
    with app_client(tmp_path, clock, upstream=vendor) as client:
        key = issue(client, constraints={"max_calls_per_minute": 3})
        assert key["constraints"] == {"mode": "enforce", "max_calls_per_minute": 3}
        for _ in range(3):
            assert charge(client, key["vault_key"]).status_code == 200
        refused = charge(client, key["vault_key"])
        assert refused.status_code == 429
        assert refused.headers["X-Keybrake-Rate-Limited"] == "true"
        assert refused.headers["Retry-After"] == "61"  # the three leave the window together
        assert refused.headers["X-Keybrake-Code"] == "keybrake_rate_limited"
        assert "X-Keybrake-Cap-Hit" not in refused.headers
        assert refused.json()["error"]["code"] == "keybrake_rate_limited"
        clock.advance(seconds=60)  # still inside: the window is this second and the 60 before
        assert charge(client, key["vault_key"]).headers["Retry-After"] == "1"
        clock.advance(seconds=1)
        assert charge(client, key["vault_key"]).status_code == 200
        assert len(vendor.sent) == 4
        rows = audit(client, key["key_id"])
        assert [row["decision"] for row in rows].count("rate_limited") == 2
        limited = [row for row in rows if row["decision"] == "rate_limited"]
        assert all(row["reserved_usd"] == "0.00" and row["status"] == 429 for row in limited)
        info = client.get(f"/vault/keys/{key['key_id']}").json()
        assert info["spent_usd"] == "4.00" and info["cap_hits"] == 0


def test_the_proxys_own_lookups_take_a_place_in_the_rate(tmp_path: Path) -> None:
    """A confirm is two calls at the vendor: the lookup of the intent's amount, then the
    confirm itself."""
    clock, vendor = Clock(), StubUpstream()
    with app_client(tmp_path, clock, upstream=vendor) as client:
        key = issue(
            client,
            allowed_endpoints=["POST /v1/payment_intents/*/confirm"],
            constraints={"max_calls_per_minute": 3},
        )
        auth = {"Authorization": f"Bearer {key['vault_key']}"}

        def confirm(intent: str) -> httpx.Response:
            answer: httpx.Response = client.post(
                f"/stripe/v1/payment_intents/{intent}/confirm", headers=auth
            )
            return answer

        assert confirm("pi_a").status_code == 200
        # One place left: its lookup would fit, but not the confirm after it, so the lookup
        # is refused too, and nothing is sent (a lookup never takes a place its call lacks).
        second = confirm("pi_b")
        assert second.status_code == 429 and second.headers["Retry-After"] == "61"
        assert [method for method, *_ in vendor.sent] == ["GET", "POST"]
        clock.advance(seconds=61)
        assert confirm("pi_c").status_code == 200
        assert [method for method, *_ in vendor.sent] == ["GET", "POST", "GET", "POST"]
        assert [row["decision"] for row in audit(client, key["key_id"])] == [
            "forwarded",
            "rate_limited",
            "forwarded",
        ]


def test_a_call_counts_in_the_second_it_goes_out_not_the_one_it_arrived_in(
    tmp_path: Path,
) -> None:
    """A confirm whose lookup takes two seconds is counted when it goes out: 61 seconds after it
    arrived (59 after it went out) it is still in the window, so another confirm (its lookup and
    itself) does not fit under 2 a minute; counted at arrival, it would have."""
    clock = Clock()

    class SlowLookups(StubUpstream):
        async def respond(
            self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None
        ) -> Any:
            if method == "GET":
                clock.advance(seconds=2)
            return await super().respond(method, url, headers, body)

    vendor = SlowLookups()
    with app_client(tmp_path, clock, upstream=vendor) as client:
        key = issue(
            client,
            allowed_endpoints=["POST /v1/payment_intents", "POST /v1/payment_intents/*/confirm"],
            constraints={"max_calls_per_minute": 2},
        )
        auth = {"Authorization": f"Bearer {key['vault_key']}"}
        confirmed = client.post("/stripe/v1/payment_intents/pi_a/confirm", headers=auth)
        assert confirmed.status_code == 200
        clock.advance(seconds=59)
        again = client.post("/stripe/v1/payment_intents/pi_b/confirm", headers=auth)
        assert again.status_code == 429 and again.headers["Retry-After"] == "2"
        assert len(vendor.sent) == 2


def test_a_report_only_rate_forwards_everything_and_says_what_it_would_have_refused(
    tmp_path: Path,
) -> None:
    clock, vendor = Clock(), StubUpstream()
    with app_client(tmp_path, clock, upstream=vendor) as client:
        key = issue(client, constraints={"max_calls_per_minute": 1, "mode": "report"})
        assert [charge(client, key["vault_key"]).status_code for _ in range(3)] == [200] * 3
        assert len(vendor.sent) == 3
        notes = [row["reported"] for row in audit(client, key["key_id"])]
        assert notes == [None] + ["rate_limited: over max_calls_per_minute"] * 2
        assert reports(client, "rate_limited") == 2


def test_report_only_constraints_forward_and_audit_each_would_be_refusal(tmp_path: Path) -> None:
    clock, vendor = Clock(), StubUpstream()
    with app_client(tmp_path, clock, upstream=vendor) as client:
        key = issue(client, constraints={"customers": ["cus_1"], "mode": "report"})
        assert charge(client, key["vault_key"], customer="cus_1").status_code == 200
        assert charge(client, key["vault_key"], customer="cus_2").status_code == 200
        assert charge(client, key["vault_key"]).status_code == 200  # no customer: unreadable
        assert len(vendor.sent) == 3
        rows = audit(client, key["key_id"])
        assert [row["decision"] for row in rows] == ["forwarded"] * 3
        assert [row["reported"] for row in rows] == [
            None,
            "constraint_violated: customers: 'cus_2' is not allowed",
            "constraint_violated: customers: POST /v1/payment_intents names no customer",
        ]
        assert reports(client, "constraint_violated") == 2
        # The dashboard's calls say it too, beside the decision (escaped as any caller's text).
        assert sign_in(client, ADMIN_KEY).status_code == 303
        page = client.get("/ui/run", params={"label": key["agent_run_label"]}).text
        assert "reported: constraint_violated: customers: &#39;cus_2&#39; is not allowed" in page
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        enforced = issue(client, constraints={"customers": ["cus_1"]})
        assert charge(client, enforced["vault_key"], customer="cus_2").status_code == 403
        assert len(vendor.sent) == 3


@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_report_mode_changes_no_outcome_but_the_refusals_it_reports(
    tmp_path: Path, mode: str
) -> None:
    """The same calls under one policy enforced and reported: every call that the enforced
    policy admits, the reported one admits alike (and settles alike); the rest it forwards."""
    clock, vendor = Clock(), StubUpstream()
    with app_client(tmp_path, clock, upstream=vendor) as client:
        policy = {"customers": ["cus_1"], "max_calls_per_minute": 2, "mode": mode}
        key = issue(client, daily_usd_cap=3, constraints=policy)
        statuses = [
            charge(client, key["vault_key"], customer=customer).status_code
            for customer in ("cus_1", "cus_9", "cus_1", "cus_1", "cus_1")
        ]
        if mode == "enforce":
            assert statuses == [200, 403, 200, 429, 429]
        else:
            assert statuses == [200, 200, 200, 429, 429]  # the daily cap ($3) is not reported
        info = client.get(f"/vault/keys/{key['key_id']}").json()
        assert info["spent_usd"] == ("2.00" if mode == "enforce" else "3.00")


def test_the_cli_takes_a_call_rate_as_a_constraint() -> None:
    from keybrake.cli import _options as options

    assert options.constraints(["max_calls_per_minute=60", "customers=cus_1"], "report") == {
        "mode": "report",
        "max_calls_per_minute": 60,
        "customers": ["cus_1"],
    }
    with pytest.raises(typer.Exit) as exited:
        options.constraints(["max_calls_per_minute=sixty"], None)
    assert exited.value.exit_code == 2
