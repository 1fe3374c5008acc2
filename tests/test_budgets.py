"""Budgets bound to a run: one budget across keys and vendors, lifetime and per-pod caps, and
changing a live budget, through the proxy app on real sockets (several replicas over one
PostgreSQL database), the official SDKs, localstripe and the Resend fake. Several workers of one
`keybrake serve` process: tests/e2e/test_budgets_processes.py."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import resend
import stripe

from keybrake.proxy.money import format_usd
from tests import test_replicas
from tests.fakes.resend_upstream import FakeResend
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.twilio_upstream import FakeTwilio
from tests.helpers import localstripe_intents
from tests.inproc import Clock, StubUpstream, app_client
from tests.inproc import settings as proxy_settings
from tests.proxyproc import ADMIN_KEY, Localstripe, ProxyProcess
from tests.served import ServedProxy, serve_proxy
from tests.test_replicas import stop_all
from tests.vendor_helpers import vendor_env

# Its PostgreSQL tests share one database, as new before each (see tests.test_replicas).
pg_url = test_replicas.pg_url

pytest_plugins = ["tests.vendor_fixtures"]

PI = "/v1/payment_intents"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

Proxy = ProxyProcess | ServedProxy


@pytest.fixture(scope="module")
def admin_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProxy]:
    """One proxy for the tests of the admin API's rules, which never reach a vendor: each makes
    its own keys and budgets (under labels of its own) and reads back only those."""
    proxy = serve_proxy(tmp_path_factory.mktemp("budgets-admin"))
    yield proxy
    proxy.stop()


def budget(proxy: Proxy, **spec: Any) -> dict[str, Any]:
    body = {"agent_run_label": "argo/run-budget", "total_usd_cap": 300, "expires_in": "3h"}
    body.update(spec)
    with proxy.admin() as admin:
        response = admin.post("/vault/budgets", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def key_on(proxy: Proxy, budget_id: str | None, **spec: Any) -> dict[str, Any]:
    # No cap of its own unless given: the budget's caps bound it.
    body: dict[str, Any] = {
        "agent_run_label": "argo/run-budget",
        "expires_in": "2h",
        "daily_usd_cap": None,
    }
    if budget_id:
        body["budget_id"] = budget_id
    body.update(spec)
    return proxy.issue(**body)


async def blast(targets: list[tuple[str, str]], count: int, amount: int = 100) -> Counter[int]:
    """`count` concurrent priced calls, spread round-robin over (base URL, vault key) pairs, each
    on a connection of its own. (aiohttp: httpx's pool spent seconds of the test process's CPU
    per 500 such calls, scanning its connections for every request.)"""
    connector = aiohttp.TCPConnector(limit=count, limit_per_host=count)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(index: int) -> int:
            base, vault_key = targets[index % len(targets)]
            async with session.post(
                f"{base}/stripe{PI}",
                data=f"amount={amount}&currency=usd&metadata[i]={index}".encode(),
                headers={"Authorization": f"Bearer {vault_key}", **FORM},
            ) as response:
                await response.read()
                return response.status

        return Counter(await asyncio.gather(*(one(i) for i in range(count))))


def info(proxy: Proxy, path: str) -> dict[str, Any]:
    with proxy.admin() as admin:
        return dict(admin.get(path).json())


@pytest.mark.postgres
def test_one_budget_is_exact_across_three_replicas(
    tmp_path: Path, pg_url: str, fake_stripe: FakeStripe
) -> None:
    for i in range(3):
        (tmp_path / str(i)).mkdir()
    procs = [
        serve_proxy(tmp_path / str(i), stripe_base=fake_stripe.url, database_url=pg_url)
        for i in range(3)
    ]
    try:
        run = budget(procs[0], total_usd_cap=300)
        keys = [key_on(procs[0], run["budget_id"], dedupe_window="0") for _ in range(2)]
        targets = [(p.url, k["vault_key"]) for p in procs for k in keys]
        statuses = asyncio.run(blast(targets, 500))
        shown = info(procs[2], f"/vault/budgets/{run['budget_id']}")
    finally:
        stop_all(procs)
    assert statuses == {200: 300, 429: 200}
    assert fake_stripe.count("POST", PI) == 300
    assert (shown["total_spent_usd"], shown["reserved_usd"]) == ("300.00", "0.00")


def test_each_pod_stops_at_its_own_cap_and_a_retried_item_keeps_counting(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    key = fake_proxy.issue(daily_usd_cap=100, max_usd_per_caller=10, dedupe_window="0")

    def spend_until_refused(tag: str) -> tuple[int, dict[str, Any]]:
        client = stripe.StripeClient(
            f"{key['vault_key']}.{tag}",
            base_addresses={"api": fake_proxy.url + "/stripe"},
            max_network_retries=0,
        )
        for calls in range(100):
            try:
                client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
            except stripe.RateLimitError as exc:
                assert exc.json_body is not None
                return calls, exc.json_body["error"]
        raise AssertionError("never capped")

    first, error = spend_until_refused("item-1@pod-a")
    second, _ = spend_until_refused("item-2@pod-b")
    # Argo re-runs item 1 in a new pod: the item's count goes on, the audit shows the new pod.
    retried, _ = spend_until_refused("item-1@pod-c")
    assert (first, second, retried) == (10, 10, 0)
    assert error["code"] == "keybrake_caller_cap_exceeded"
    shown = info(fake_proxy, f"/vault/keys/{key['key_id']}")
    assert shown["spent_usd"] == "20.00" and shown["max_usd_per_caller"] == "10.00"
    tags = {r["caller_tag"] for r in info(fake_proxy, "/vault/audit?limit=100")["data"]}
    assert {"item-1@pod-a", "item-2@pod-b", "item-1@pod-c"} <= tags


def test_raising_a_spent_budget_admits_exactly_the_difference(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    run = budget(fake_proxy, total_usd_cap=300)
    key = key_on(fake_proxy, run["budget_id"], dedupe_window="0")
    first = asyncio.run(blast([(fake_proxy.url, key["vault_key"])], 320))
    assert first == {200: 300, 429: 20}
    with fake_proxy.admin() as admin:
        raised = admin.patch(
            f"/vault/budgets/{run['budget_id']}",
            json={"total_usd_cap": 400, "reason": "month-end batch approved by finance"},
        )
    assert raised.status_code == 200, raised.text
    assert raised.json()["changes"] == [
        {
            "field": "total_usd_cap",
            "old": "300.00",
            "new": "400.00",
            "reason": "month-end batch approved by finance",
            "at": raised.json()["changes"][0]["at"],
        }
    ]
    second = asyncio.run(blast([(fake_proxy.url, key["vault_key"])], 150))
    assert second == {200: 100, 429: 50}
    assert fake_stripe.count("POST", PI) == 400


def test_deleting_a_budget_refuses_every_key_on_it_at_once(
    fake_proxy: ServedProxy, fake_stripe: FakeStripe
) -> None:
    run = budget(fake_proxy)
    keys = [key_on(fake_proxy, run["budget_id"]) for _ in range(2)]
    other = key_on(fake_proxy, None, daily_usd_cap=10)
    with fake_proxy.admin() as admin:
        deleted = admin.delete(f"/vault/budgets/{run['budget_id']}")
    assert deleted.json()["status"] == "revoked"
    for key in keys:
        refused = httpx.post(
            f"{fake_proxy.url}/stripe{PI}",
            content=b"amount=100&currency=usd",
            headers={"Authorization": f"Bearer {key['vault_key']}", **FORM},
        )
        assert refused.status_code == 401
        assert info(fake_proxy, f"/vault/keys/{key['key_id']}")["status"] == "revoked"
    assert info(fake_proxy, f"/vault/keys/{other['key_id']}")["status"] == "active"
    assert fake_stripe.requests == []


def test_revoking_a_workflow_revokes_its_budgets(admin_proxy: ServedProxy) -> None:
    run = budget(admin_proxy, agent_run_label="argo/wf-9")
    key = key_on(admin_proxy, run["budget_id"], agent_run_label="argo/wf-9")
    with admin_proxy.admin() as admin:
        result = admin.post("/vault/keys/revoke", json={"agent_run_label": "argo/wf-9"}).json()
    assert result["revoked"] == 1 and result["keys"][0]["key_id"] == key["key_id"]
    assert [b["budget_id"] for b in result["budgets"]] == [run["budget_id"]]
    assert result["budgets"][0]["status"] == "revoked"


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"daily_usd_cap": 50}, 400, "reason"),
        ({"reason": "  "}, 400, "reason"),
        ({"reason": "nothing to change"}, 400, "at least one"),
        ({"reason": "x", "daily_usd_cap": -5}, 400, "positive"),
        ({"reason": "x", "expires_in": "30d"}, 400, "at most until"),
        ({"reason": "x", "max_usd_per_caller": 5}, 400, "issued without one"),
        ({"reason": "x", "daily_usd_cap": 50, "colour": "red"}, 400, "colour"),
    ],
)
def test_a_patch_that_cannot_apply_is_refused_and_changes_nothing(
    admin_proxy: ServedProxy, body: dict[str, Any], status: int, message: str
) -> None:
    key = admin_proxy.issue(daily_usd_cap=10)
    with admin_proxy.admin() as admin:
        response = admin.patch(f"/vault/keys/{key['key_id']}", json=body)
        after = admin.get(f"/vault/keys/{key['key_id']}").json()
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert (after["daily_usd_cap"], after["expires_at"], after["changes"]) == (
        "10.00",
        key["expires_at"],
        [],
    )


def test_a_revoked_key_or_budget_cannot_be_patched(admin_proxy: ServedProxy) -> None:
    run = budget(admin_proxy)
    key = admin_proxy.issue(daily_usd_cap=10)
    with admin_proxy.admin() as admin:
        admin.delete(f"/vault/keys/{key['key_id']}")
        admin.delete(f"/vault/budgets/{run['budget_id']}")
        for path in (f"/vault/keys/{key['key_id']}", f"/vault/budgets/{run['budget_id']}"):
            response = admin.patch(path, json={"reason": "too late", "total_usd_cap": 500})
            assert response.status_code == 409, response.text
            assert admin.get(path).json()["changes"] == []
        unknown = admin.patch("/vault/keys/vk_nope", json={"reason": "x", "total_usd_cap": 5})
        assert unknown.status_code == 404


def test_issue_rules_for_budgets(admin_proxy: ServedProxy) -> None:
    run = budget(admin_proxy, expires_in="1h")
    base = {
        "vendor": "stripe",
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "agent_run_label": "argo/x",
    }
    with admin_proxy.admin() as admin:
        no_cap = admin.post("/vault/keys", json=base)
        outlives = admin.post(
            "/vault/keys", json={**base, "budget_id": run["budget_id"], "expires_in": "2h"}
        )
        unknown = admin.post(
            "/vault/keys", json={**base, "budget_id": "bg_0000000000000000", "expires_in": "5m"}
        )
        bad_budget = admin.post("/vault/budgets", json={"agent_run_label": "argo/x"})
        too_long = admin.post(
            "/vault/budgets",
            json={"agent_run_label": "argo/x", "total_usd_cap": 1, "expires_in": "31d"},
        )
    assert no_cap.status_code == 400 and "budget_id" in no_cap.json()["error"]["message"]
    assert outlives.status_code == 400 and "outlive" in outlives.json()["error"]["message"]
    assert unknown.status_code == 400
    assert bad_budget.status_code == 400
    assert too_long.status_code == 400 and "30d" in too_long.json()["error"]["message"]


def test_a_key_on_a_budget_lives_as_long_as_it_unless_told_otherwise(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 11, 26, 12, 0, tzinfo=UTC))
    base = {
        "vendor": "stripe",
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "agent_run_label": "argo/x",
    }
    with app_client(tmp_path, clock, max_ttl="1d") as client:
        short = client.post(
            "/vault/budgets",
            json={"agent_run_label": "argo/x", "total_usd_cap": 5, "expires_in": "6h"},
        ).json()
        long = client.post(
            "/vault/budgets",
            json={"agent_run_label": "argo/x", "total_usd_cap": 5, "expires_in": "3d"},
        ).json()
        clock.advance(minutes=5)
        on_short = client.post("/vault/keys", json={**base, "budget_id": short["budget_id"]})
        on_long = client.post("/vault/keys", json={**base, "budget_id": long["budget_id"]})
        alone = client.post("/vault/keys", json={**base, "total_usd_cap": 5})
        told = client.post(
            "/vault/keys", json={**base, "budget_id": short["budget_id"], "expires_in": "1h"}
        )
    assert [r.status_code for r in (on_short, on_long, alone, told)] == [201] * 4
    assert on_short.json()["expires_at"] == short["expires_at"] == "2026-11-26T18:00:00.000000Z"
    assert on_long.json()["expires_at"] == "2026-11-27T12:05:00.000000Z"  # the longest key life
    assert alone.json()["expires_at"] == "2026-11-26T13:05:00.000000Z"  # 1h without a budget
    assert told.json()["expires_at"] == "2026-11-26T13:05:00.000000Z"


def test_patches_take_effect_on_the_next_call_of_another_replica(
    tmp_path: Path, pg_url: str
) -> None:
    """Two replicas in-process on one PostgreSQL database, with one clock: whatever one changes,
    the other enforces on its next call (caps and expiry are read in the reservation)."""
    from keybrake.proxy.app import build_app

    clock = Clock(datetime(2026, 11, 26, 12, 0, tzinfo=UTC))

    async def scenario() -> list[Any]:
        apps = [
            build_app(
                proxy_settings(tmp_path, database_url=pg_url), clock=clock, upstream=StubUpstream()
            )
            for _ in range(2)
        ]
        seen: list[Any] = []
        async with (
            apps[0].router.lifespan_context(apps[0]),
            apps[1].router.lifespan_context(apps[1]),
        ):
            clients = [
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url="http://k",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                )
                for app in apps
            ]
            a, b = clients
            key = (
                await a.post(
                    "/vault/keys",
                    json={
                        "vendor": "stripe",
                        "daily_usd_cap": 10,
                        "allowed_endpoints": ["POST /v1/payment_intents"],
                        "expires_in": "2h",
                        "agent_run_label": "argo/replicas",
                        "dedupe_window": "0",
                    },
                )
            ).json()
            auth = {"Authorization": f"Bearer {key['vault_key']}", **FORM}

            async def call(client: httpx.AsyncClient, i: int) -> int:
                body = f"amount=300&currency=usd&metadata[i]={i}".encode()
                return (await client.post(f"/stripe{PI}", content=body, headers=auth)).status_code

            seen.append([await call(b, 1), await call(b, 2)])  # $6 spent through b
            lowered = await a.patch(
                f"/vault/keys/{key['key_id']}",
                json={"daily_usd_cap": 5, "reason": "incident: stop this run's spending"},
            )
            seen.append(lowered.status_code)
            seen.append(await call(b, 3))  # below what is spent: the next priced call is refused
            shortened = await a.patch(
                f"/vault/keys/{key['key_id']}",
                json={"daily_usd_cap": 50, "expires_in": "10m", "reason": "wind down"},
            )
            seen.append(shortened.json()["expires_at"])
            seen.append(await call(b, 4))
            clock.advance(minutes=10)  # the new end of its life
            seen.append(await call(b, 5))
            shown = (await b.get(f"/vault/keys/{key['key_id']}")).json()
            seen.append([(c["field"], c["old"], c["new"]) for c in shown["changes"]])
            for client in clients:
                await client.aclose()
        return seen

    first, lowered, after_lowering, new_end, after_raise, after_end, changes = asyncio.run(
        scenario()
    )
    assert first == [200, 200] and lowered == 200
    assert after_lowering == 429
    assert new_end == "2026-11-26T12:10:00.000000Z"
    assert after_raise == 200
    assert after_end == 401
    assert changes == [
        ("daily_usd_cap", "10.00", "5.00"),
        ("daily_usd_cap", "5.00", "50.00"),
        ("expires_at", "2026-11-26T14:00:00.000000Z", "2026-11-26T12:10:00.000000Z"),
    ]


def test_stripe_and_resend_under_one_budget_hold_no_more_than_it(
    tmp_path: Path,
    fresh_localstripe: Localstripe,
    fake_twilio: FakeTwilio,
    fake_resend: FakeResend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One run, two vendors, one $5 budget: a $1 PaymentIntent per call on localstripe and
    $0.0009 emails on the Resend fake, both through their official SDKs, until refused."""
    proxy = serve_proxy(
        tmp_path,
        stripe_base=fresh_localstripe.url,
        extra_env={**vendor_env(fake_twilio, fake_resend), "KEYBRAKE_DEDUPE_WINDOW": "0"},
    )
    try:
        run = budget(proxy, total_usd_cap="5.0045")
        stripe_key = key_on(proxy, run["budget_id"], vendor="stripe")
        resend_key = key_on(
            proxy, run["budget_id"], vendor="resend", allowed_endpoints=["POST /emails"]
        )
        tag = uuid.uuid4().hex
        client = stripe.StripeClient(
            stripe_key["vault_key"],
            base_addresses={"api": proxy.url + "/stripe"},
            max_network_retries=0,
        )
        monkeypatch.setattr(resend, "api_key", resend_key["vault_key"])
        monkeypatch.setattr(resend, "api_url", proxy.url + "/resend")
        charged = emailed = 0
        stripe_open = resend_open = True
        while stripe_open or resend_open:
            if resend_open:
                try:
                    resend.Emails.send(
                        {
                            "from": "a@example.com",
                            "to": "b@example.com",
                            "subject": f"{emailed}",
                            "text": "t",
                        }
                    )
                    emailed += 1
                except resend.exceptions.RateLimitError:
                    resend_open = False
            if stripe_open:
                try:
                    client.v1.payment_intents.create(
                        params={"amount": 100, "currency": "usd", "metadata": {"run": tag}}
                    )
                    charged += 1
                except stripe.RateLimitError:
                    stripe_open = False
        shown = info(proxy, f"/vault/budgets/{run['budget_id']}")
    finally:
        proxy.stop()
    held = len(localstripe_intents(fresh_localstripe.url, run=tag))
    assert held == charged and len(fake_resend.emails) == emailed
    # What the vendors hold, priced as the proxy prices it, stays within the budget.
    moved = held * 1_000_000 + emailed * 900
    assert 5_004_500 - 900 < moved <= 5_004_500
    assert charged >= 1 and emailed >= 1
    assert shown["total_spent_usd"] == format_usd(moved)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_patch_raced_by_another_is_refused_not_judged_on_the_old_state(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The policy check and the write are two steps; a patch landing between them makes this
    one a 409 that changes nothing, so no patch is ever applied to a record it was not checked
    against (two loosening patches racing cannot each pass on the state before the other)."""
    from keybrake.proxy.store import open_store
    from keybrake.proxy.store.records import Patch
    from tests.inproc import issue

    url = f"sqlite:///{tmp_path / 'race.db'}"
    if backend == "postgres":
        url = str(request.getfixturevalue("pg_url"))
    store: Any = open_store(url)
    original = store.patch

    async def raced(subject_id: str, patch: Patch, now: datetime, event: Any) -> str:
        if patch.reason == "raced":  # another request's patch commits first
            meanwhile = Patch("meanwhile", daily_cap_micros=50_000_000)
            assert await original(subject_id, meanwhile, now, event) == "patched"
        result: str = await original(subject_id, patch, now, event)
        return result

    store.patch = raced
    with app_client(tmp_path, store=store) as client:
        key = issue(client, daily_usd_cap=100)
        path = f"/vault/keys/{key['key_id']}"
        refused = client.patch(path, json={"daily_usd_cap": 150, "reason": "raced"})
        after = client.get(path).json()
        retried = client.patch(path, json={"daily_usd_cap": 150, "reason": "again"})
    assert refused.status_code == 409, refused.text
    assert "changed by another request" in refused.json()["error"]["message"]
    assert after["daily_usd_cap"] == "50.00"
    assert [c["reason"] for c in after["changes"]] == ["meanwhile"]
    assert retried.status_code == 200 and retried.json()["daily_usd_cap"] == "150.00"
