"""The dashboard (/ui/) in-process, on both backends: sign-in and sessions, what an issuer may
see, the revoke form's CSRF and origin checks, paging and filters (runs, and a run's calls by
decision and caller), the numbers and chart points against the admin API, the charts' SVG, the
sign-out button on every signed-in page, and bad input. The same pages in a real browser:
tests/e2e/test_dashboard_browser.py; the run's cap without a store: tests/test_ui_runs.py."""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from keybrake.proxy.upstream import UpstreamResponse
from tests.inproc import Clock, StubUpstream, app_client, issue
from tests.proxyproc import ADMIN_KEY, STRIPE_SECRET

LABEL = "argo/billing-agent-x7k2p"


class Intents(StubUpstream):
    """A Stripe-shaped vendor answering each PaymentIntent with a new id and request id."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers = itertools.count(1)

    async def send(self, method: str, url: str, headers: Any, body: bytes | None) -> Any:
        await super().send(method, url, headers, body)
        n = next(self.numbers)
        return UpstreamResponse(
            200,
            [("content-type", "application/json"), ("request-id", f"req_{n:06d}")],
            b'{"id": "pi_%06d", "object": "payment_intent", "amount": 100, "currency": "usd"}' % n,
        )


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("pg_fresh_url")}


def sign_in(client: TestClient, token: str, next_page: str = "/ui/") -> Any:
    form = client.get("/ui/login", params={"next": next_page}, headers={"Authorization": ""})
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf, form.text
    return client.post(
        "/ui/login",
        data={"csrf": csrf.group(1), "token": token, "next": next_page},
        follow_redirects=False,
    )


def page_csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert found, html
    return found.group(1)


def spend(client: TestClient, vault_key: str, clock: Clock, calls: int, tag: str = "pod-0") -> None:
    for i in range(calls):
        clock.advance(seconds=30)
        client.post(
            "/stripe/v1/payment_intents",
            data={"amount": "100", "currency": "usd", "metadata[n]": f"{tag}-{i}"},
            headers={"Authorization": f"Bearer {vault_key}.{tag}"},
        )


def test_pages_need_a_session(tmp_path: Path) -> None:
    with app_client(tmp_path, upstream=Intents()) as client:
        key = issue(client, agent_run_label=LABEL)
        client.headers.pop("Authorization")  # the admin API's header signs nobody in here
        for path in ("/ui/", f"/ui/run?label={LABEL}", f"/ui/run/revoke?label={LABEL}"):
            answer = client.get(path, follow_redirects=False)
            assert answer.status_code == 303
            assert answer.headers["location"].startswith("/ui/login?next=%2Fui%2F")
        answer = client.post("/ui/run/revoke", data={"label": LABEL}, follow_redirects=False)
        assert answer.status_code == 303
        forged = client.get("/ui/", cookies={"keybrake_session": "x" * 43}, follow_redirects=False)
        assert forged.status_code == 303
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert client.get(f"/vault/keys/{key['key_id']}", headers=admin).json()["status"] == (
            "active"
        )


def test_admin_sign_in_keeps_only_a_hash_in_a_strict_cookie(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    clock = Clock()
    with app_client(tmp_path, clock=clock, upstream=Intents(), **backend) as client:
        issue(client, agent_run_label=LABEL)
        client.headers.pop("Authorization")
        answer = sign_in(client, ADMIN_KEY, next_page=f"/ui/run?label={LABEL}")
        assert answer.status_code == 303
        assert answer.headers["location"] == f"/ui/run?label={LABEL}"
        cookie = next(
            c for c in answer.headers.get_list("set-cookie") if c.startswith("keybrake_session=")
        )
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "path=/ui", "samesite=strict", "max-age=28800"} <= attributes
        assert "secure" not in attributes  # plain HTTP here; see the next test
        session_id = cookie.split(";")[0].split("=", 1)[1]
        assert ADMIN_KEY not in cookie
        page = client.get(f"/ui/run?label={LABEL}")
        assert page.status_code == 200 and "admin" in page.text
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        events = client.get("/vault/events", params={"action": "ui.login"}).json()["data"]
        assert events[0]["actor"] == "admin" and events[0]["outcome"] == "ok"
    if not backend:
        rows = (
            sqlite3.connect(tmp_path / "inproc.db").execute("SELECT * FROM ui_sessions").fetchall()
        )
        assert len(rows) == 1
        assert session_id.encode() not in repr(rows).encode()  # only its hash is stored
        assert ADMIN_KEY not in repr(rows)


def test_cookies_are_secure_over_tls_or_when_asked(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        client.headers.pop("Authorization")
        client.base_url = "https://testserver"  # as served with KEYBRAKE_TLS_CERT_FILE
        cookie = sign_in(client, ADMIN_KEY).headers["set-cookie"]
        assert cookie.startswith("keybrake_session=") and "; secure" in cookie.lower()
    # Behind a proxy that ends TLS, keybrake sees plain HTTP: `always` marks them anyway.
    with app_client(tmp_path, ui_cookie_secure="always") as client:
        assert "; secure" in client.get("/ui/login").headers["set-cookie"].lower()


def test_refused_sign_ins_say_why_and_are_recorded(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        client.headers.pop("Authorization")
        wrong = sign_in(client, "kba_wrong_token_0000000000")
        assert wrong.status_code == 401
        assert "invalid admin token" in wrong.text or "token" in wrong.text
        assert "kba_wrong_token" not in wrong.text
        jwt = sign_in(client, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
        assert jwt.status_code == 401 and "not a service-account token" in jwt.text
        empty = sign_in(client, "")
        assert empty.status_code == 401
        # No form cookie (a form posted from elsewhere): refused before the token is read.
        client.cookies.clear()
        stale = client.post(
            "/ui/login", data={"csrf": "x", "token": ADMIN_KEY}, follow_redirects=False
        )
        assert stale.status_code == 400 and "keybrake_session" not in stale.headers.get(
            "set-cookie", ""
        )
        # Only dashboard pages of this site are a `next`.
        for evil in ("//evil.example/ui/", "https://evil.example/", "/vault/keys", "/ui/\\x"):
            assert sign_in(client, ADMIN_KEY, next_page=evil).headers["location"] == "/ui/"
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        refused = client.get("/vault/events", params={"action": "login.refused"}).json()["data"]
        assert {e["target"] for e in refused} == {"POST /ui/login"}
        assert len(refused) == 3


def test_sessions_expire_and_sign_out_ends_them(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock()
    with app_client(tmp_path, clock=clock, **backend) as client:
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)
        assert client.get("/ui/").status_code == 200
        clock.advance(hours=8, seconds=1)
        assert client.get("/ui/", follow_redirects=False).status_code == 303

        sign_in(client, ADMIN_KEY)
        session = client.cookies["keybrake_session"]
        page = client.get("/ui/")
        out = client.post("/ui/logout", data={"csrf": page_csrf(page.text)}, follow_redirects=False)
        assert out.status_code == 303 and out.headers["location"].startswith("/ui/login")
        assert 'keybrake_session=""' in out.headers["set-cookie"]
        # The old cookie, replayed, is no session any more: it was deleted, not just forgotten.
        replayed = client.get("/ui/", cookies={"keybrake_session": session}, follow_redirects=False)
        assert replayed.status_code == 303


def test_changing_the_admin_token_ends_admin_sessions(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)
        session = client.cookies["keybrake_session"]
    with app_client(tmp_path, api_key="kba_rotated_admin_token_987654321") as client:
        answer = client.get("/ui/", cookies={"keybrake_session": session}, follow_redirects=False)
        assert answer.status_code == 303


def test_an_issuer_sees_and_revokes_only_its_prefix(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    with app_client(tmp_path, upstream=Intents(), **backend) as client:
        made = client.post(
            "/vault/issuers", json={"name": "payments", "label_prefix": "argo/payments-"}
        ).json()
        token = made["issuer_token"]
        mine = issue(client, agent_run_label="argo/payments-run1")
        theirs = issue(client, agent_run_label="argo/reports-run2")
        client.headers.pop("Authorization")
        sign_in(client, token)
        runs = client.get("/ui/")
        assert "argo/payments-run1" in runs.text and "argo/reports-run2" not in runs.text
        assert (
            token not in runs.text
            and token not in client.get("/ui/run?label=argo/payments-run1").text
        )
        assert "payments" in runs.text  # who is signed in
        assert client.get("/ui/run?label=argo/reports-run2").status_code == 404
        assert client.get("/ui/run/revoke?label=argo/reports-run2").status_code == 404
        csrf = page_csrf(runs.text)
        refused = client.post("/ui/run/revoke", data={"csrf": csrf, "label": "argo/reports-run2"})
        assert refused.status_code == 404
        done = client.post(
            "/ui/run/revoke",
            data={"csrf": csrf, "label": "argo/payments-run1"},
            follow_redirects=False,
        )
        assert done.status_code == 303
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        assert client.get(f"/vault/keys/{theirs['key_id']}").json()["status"] == "active"
        assert client.get(f"/vault/keys/{mine['key_id']}").json()["status"] == "revoked"
        # Deleting the issuer ends its sessions at once.
        assert client.delete(f"/vault/issuers/{made['issuer_id']}").status_code == 200
        client.headers.pop("Authorization")
        assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_revoke_needs_the_page_csrf_token_and_this_site(tmp_path: Path) -> None:
    with app_client(tmp_path, upstream=Intents()) as client:
        key = issue(client, agent_run_label=LABEL)
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)
        confirm = client.get("/ui/run/revoke", params={"label": LABEL})
        assert confirm.status_code == 200 and 'id="live-keys">1<' in confirm.text
        csrf = page_csrf(confirm.text)
        attempts = [
            ({"label": LABEL}, {}),
            ({"label": LABEL, "csrf": "0" * 64}, {}),
            ({"label": LABEL, "csrf": csrf}, {"Origin": "https://evil.example"}),
            ({"label": LABEL, "csrf": csrf}, {"Sec-Fetch-Site": "cross-site"}),
            ({"label": LABEL, "csrf": csrf}, {"Origin": "null"}),
        ]
        for form, headers in attempts:
            answer = client.post("/ui/run/revoke", data=form, headers=headers)
            assert answer.status_code == 400, (form, headers)
        twice = client.post(
            "/ui/run/revoke",
            content=f"csrf={csrf}&label={LABEL}&label=argo/other",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert twice.status_code == 400 and "given twice" in twice.text
        as_json = client.post("/ui/run/revoke", json={"csrf": csrf, "label": LABEL})
        assert as_json.status_code == 400
        # A label the API refuses (it holds what looks like a vault key) is no run: it was a
        # 500, with the secret-looking label in the logged traceback.
        secret = "kbv_" + "A" * 43
        secretive = client.post(
            "/ui/run/revoke",
            data={"label": secret, "csrf": csrf},
            headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        )
        assert secretive.status_code == 404 and secret not in secretive.text
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        assert client.get(f"/vault/keys/{key['key_id']}").json()["status"] == "active"
        client.headers.pop("Authorization")

        done = client.post(
            "/ui/run/revoke",
            data={"label": LABEL, "csrf": csrf},
            headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
            follow_redirects=False,
        )
        assert done.status_code == 303
        page = client.get(done.headers["location"])
        assert "Revoked: 1 of this run's keys and budgets are revoked now." in page.text
        assert 'http-equiv="refresh"' not in page.text  # an ended run stops reloading
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        assert client.get(f"/vault/keys/{key['key_id']}").json()["status"] == "revoked"
        event = client.get("/vault/events", params={"action": "label.revoke"}).json()["data"][0]
        assert event["detail"]["via"] == "dashboard" and event["actor"] == "admin"
        assert event["detail"]["revoked_keys"] == [key["key_id"]]


def test_run_numbers_and_chart_points_are_the_apis(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock()
    with app_client(tmp_path, clock=clock, upstream=Intents(), **backend) as client:
        key = issue(client, agent_run_label=LABEL, daily_usd_cap=None, total_usd_cap="6.00")
        for tag in ("pod-a", "pod-b", "pod-c"):
            spend(client, key["vault_key"], clock, 3, tag=tag)  # 9 calls; the 7th hits the cap
        info = client.get(f"/vault/keys/{key['key_id']}").json()
        audit = client.get("/vault/audit", params={"label": LABEL, "limit": 100}).json()["data"]
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)
        page = client.get("/ui/run", params={"label": LABEL}).text

        assert re.search(r'id="spent" data-micros="(\d+)"', page).group(1) == "6000000"
        assert Decimal(info["total_spent_usd"]) == Decimal("6.00")
        assert (
            f'id="calls">{info["calls"]}<' in page and f'id="cap-hits">{info["cap_hits"]}<' in page
        )
        assert info["cap_hits"] == 3
        cumulative: dict[str, Decimal] = defaultdict(Decimal)
        for row in audit:
            cumulative[row["ts"][:19] + "Z"] += Decimal(row["settled_usd"])
        expected, total = [], Decimal(0)
        for second in sorted(cumulative):
            total += cumulative[second]
            expected.append((second, str(total)))
        points = re.findall(r'data-at="([^"]+)" data-usd="([^"]+)"', page)
        assert points == expected and len(points) == 9
        hit_points = re.findall(r'data-at="([^"]+)" data-count="(\d+)"', page)
        assert [int(n) for _, n in hit_points] == [1, 1, 1]
        assert 'id="cap-line"' in page and 'data-usd="$6.00"' in page
        # Each Stripe request id links to the request log of Stripe's (test mode) dashboard.
        assert 'href="https://dashboard.stripe.com/test/logs/req_000001"' in page
        assert 'http-equiv="refresh" content="10"' in page  # live: it reloads itself
        callers = re.findall(r'data-caller="([^"]+)"', page)
        assert callers == ["pod-a", "pod-b", "pod-c"]
        assert key["vault_key"] not in page and STRIPE_SECRET not in page


def test_runs_list_pages_and_filters(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock()
    with app_client(tmp_path, clock=clock, upstream=Intents(), **backend) as client:
        keys = []
        for i in range(30):
            clock.advance(seconds=1)
            keys.append(issue(client, agent_run_label=f"argo/run-{i:02d}", total_usd_cap=10))
        spend(client, keys[29]["vault_key"], clock, 2)
        client.post("/vault/keys/revoke", json={"agent_run_label": "argo/run-00"})
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)

        first = client.get("/ui/").text
        labels = re.findall(r'<tr class="run" data-label="([^"]+)"', first)
        assert labels == [f"argo/run-{i:02d}" for i in range(29, 4, -1)]  # newest first, 25
        assert 'data-label="argo/run-29" data-spent="2000000"' in first
        next_url = re.search(r'href="([^"]+)" id="next-page"', first).group(1).replace("&amp;", "&")
        second = client.get(next_url).text
        assert re.findall(r'data-label="([^"]+)"', second) == [
            f"argo/run-{i:02d}" for i in range(4, -1, -1)
        ]
        assert 'id="next-page"' not in second and 'id="first-page"' in second

        found = client.get("/ui/", params={"q": "run-1"}).text
        assert re.findall(r'data-label="([^"]+)"', found) == [
            f"argo/run-{i:02d}" for i in range(19, 9, -1)
        ]
        ended = client.get("/ui/", params={"status": "ended"}).text
        assert re.findall(r'data-label="([^"]+)"', ended) == ["argo/run-00"]
        assert 'data-status="revoked"' in ended
        live = client.get("/ui/", params={"status": "live", "q": "run-0"}).text
        assert len(re.findall(r'data-label="', live)) == 9
        # A label with LIKE's wildcards matches only itself.
        assert "No runs match" in client.get("/ui/", params={"q": "run_0%"}).text


def test_bad_input_is_a_clear_page_never_a_500(tmp_path: Path) -> None:
    with app_client(tmp_path, upstream=Intents()) as client:
        issue(client, agent_run_label=LABEL)
        # A vendor path with markup lands in the audit rows: it is shown as text.
        client.post(
            "/stripe/v1/<img src=x onerror=alert(1)>",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)
        cases = {
            "/ui/?status=bogus": 400,
            "/ui/?continue=not-a-token": 400,
            "/ui/run": 404,
            "/ui/run?label=" + "x" * 5000: 404,
            "/ui/run?label=argo/none": 404,
            f"/ui/run?label={LABEL}&continue=%00": 400,
            "/ui/static/../dashboard.py": 404,
        }
        for path, status in cases.items():
            answer = client.get(path)
            assert answer.status_code == status, (path, answer.text[:300])
            assert "Traceback" not in answer.text
        csrf = page_csrf(client.get("/ui/").text)
        big = client.post(
            "/ui/run/revoke",
            content=b"csrf=" + csrf.encode() + b"&label=" + b"x" * 20000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert big.status_code == 400
        binary = client.post(
            "/ui/run/revoke",
            content=b"csrf=\xff\xfe&label=\xff",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert binary.status_code == 400


def test_pages_forbid_scripts_frames_and_caching(tmp_path: Path) -> None:
    with app_client(tmp_path, upstream=Intents()) as client:
        issue(client, agent_run_label=LABEL)
        client.headers.pop("Authorization")
        pages = [client.get("/ui/login")]
        sign_in(client, ADMIN_KEY)
        pages += [client.get(p) for p in ("/ui/", f"/ui/run?label={LABEL}", "/ui/run?label=x")]
        pages.append(client.get(f"/ui/run/revoke?label={LABEL}"))
        for page in pages:
            policy = page.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
            assert "script" not in policy  # no script is allowed at all
            assert page.headers["x-frame-options"] == "DENY"
            assert page.headers["cache-control"] == "no-store"
            assert "<script" not in page.text
        css = client.get("/ui/static/keybrake.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert "http" not in css.text  # nothing fetched from elsewhere


def test_runs_listing_pages_through_every_run_once(backend: dict[str, Any], tmp_path: Path) -> None:
    """The store's runs walk against a model: runs of keys only, budgets only and both, a budget
    newer than its keys, rows created in the same microsecond, revoked and expired rows, and an
    issuer's scope; paged two at a time, every run comes once, in order, with its counts."""
    import random
    from datetime import timedelta

    from keybrake.proxy.store import open_store
    from keybrake.proxy.store.records import BudgetRecord, Event, KeyRecord, Owner, RunFilter, Scope

    url = backend.get("database_url", f"sqlite:///{tmp_path / 'runs.db'}")
    now = Clock().now
    rng = random.Random(7)
    event = Event(ts=now, action="key.issue", actor="admin", outcome="ok")
    rows: list[
        tuple[str, str, Any, bool, bool, str]
    ] = []  # label, kind, created, live, revoked, ns

    async def scenario() -> None:
        store = open_store(url)
        await store.open()
        try:
            for i in range(40):
                label = f"team-{'ab'[i % 2]}/run-{i:02d}"
                kinds = ["key", "budget", "both"][i % 3]
                base = now - timedelta(minutes=rng.randrange(0, 30))  # many runs share a minute
                for n, kind in enumerate(["key", "budget"] if kinds == "both" else [kinds] * 2):
                    created = base + timedelta(seconds=n * rng.choice([0, 1]))
                    revoked = rng.random() < 0.3
                    expires = created + timedelta(hours=1 if rng.random() < 0.8 else -1)
                    if expires <= created:
                        expires = now - timedelta(seconds=1)
                    namespace = rng.choice(["ns-1", "ns-2"])
                    owner = Owner(namespace=namespace)
                    if kind == "key":
                        key_id = f"vk_{i:02d}{n:014d}"
                        await store.create_key(
                            KeyRecord(
                                key_id=key_id,
                                key_hash=hashlib.sha256(key_id.encode()).digest(),
                                vendor="stripe",
                                label=label,
                                daily_cap_micros=1,
                                max_per_call_micros=None,
                                allowed_endpoints=("POST /v1/payment_intents",),
                                metadata={},
                                dedupe_window_s=0,
                                created_at=created,
                                expires_at=max(expires, created + timedelta(microseconds=1)),
                                owner=owner,
                            ),
                            event,
                        )
                        if revoked:
                            await store.revoke_key(key_id, now, event)
                    else:
                        budget_id = f"bg_{i:02d}{n:014d}"
                        await store.create_budget(
                            BudgetRecord(
                                budget_id=budget_id,
                                label=label,
                                daily_cap_micros=1,
                                total_cap_micros=None,
                                metadata={},
                                created_at=created,
                                expires_at=max(expires, created + timedelta(microseconds=1)),
                                owner=owner,
                            ),
                            event,
                        )
                        if revoked:
                            await store.revoke_budget(budget_id, now, event)
                    expired = max(expires, created + timedelta(microseconds=1)) <= now
                    rows.append(
                        (label, kind, created, not revoked and not expired, revoked, namespace)
                    )

            for scope in (None, Scope("team-a/"), Scope("team-b/", ("ns-1",))):
                for live in (None, True, False):
                    model: dict[str, list[Any]] = {}
                    for label, kind, created, is_live, revoked, namespace in rows:
                        if scope is not None and not scope.holds(label, Owner(namespace=namespace)):
                            continue
                        entry = model.setdefault(label, [created, created, 0, 0, 0, 0])
                        entry[0], entry[1] = max(entry[0], created), min(entry[1], created)
                        entry[2 if kind == "key" else 3] += 1
                        entry[4] += is_live
                        entry[5] += revoked
                    expected = sorted(
                        (
                            (label, *e)
                            for label, e in model.items()
                            if live is None or (e[4] > 0) == live
                        ),
                        key=lambda r: (r[1], r[0]),
                        reverse=True,
                    )
                    seen, before = [], None
                    while True:
                        page = await store.list_runs(
                            RunFilter(scope=scope, live=live, before=before, limit=2), now
                        )
                        seen += [
                            (r.label, r.newest, r.oldest, r.keys, r.budgets, r.live, r.revoked)
                            for r in page
                        ]
                        if len(page) < 2:
                            break
                        before = (page[-1].newest, page[-1].label)
                    assert seen == [tuple(r) for r in expected], (scope, live)
        finally:
            await store.close()

    import hashlib

    asyncio.run(scenario())


def test_the_documented_argo_ui_link_opens_the_run_page(tmp_path: Path) -> None:
    """docs/deploy.md's `links` entry is a valid Argo Link (v4.1.2 schema), and its URL, with
    Argo's substitution done, is the dashboard's page of that workflow's run."""
    import gzip
    import json
    import urllib.parse

    import jsonschema
    import yaml

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "deploy.md").read_text()
    block = re.search(
        r"```yaml\n# kubectl -n argo edit configmap workflow-controller-configmap\n(.*?)```",
        text,
        re.S,
    )
    assert block, "the links example is missing from docs/deploy.md"
    links = yaml.safe_load(yaml.safe_load(block.group(1))["data"]["links"])
    schema = json.loads(gzip.decompress((root / "tests" / "argo" / "schema.json.gz").read_bytes()))
    link_schema = {
        **schema["definitions"]["io.argoproj.workflow.v1alpha1.Link"],
        "additionalProperties": False,
    }
    for link in links:
        jsonschema.validate(link, link_schema)
    (link,) = [entry for entry in links if entry["scope"] == "workflow"]
    url = urllib.parse.urlsplit(link["url"].replace("${metadata.name}", "billing-agent-x7k2p"))
    with app_client(tmp_path, upstream=Intents()) as client:
        issue(client, agent_run_label=LABEL)
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)
        page = client.get(f"{url.path}?{url.query}")
        assert page.status_code == 200 and f'id="run-label">{LABEL}' in page.text


def test_a_long_runs_activity_is_summed_into_slices(
    backend: dict[str, Any], tmp_path: Path
) -> None:
    """A run longer than the chart has points is summed in the database into equal slices; no
    spend, call or cap hit is lost, and each slice starts where the chart draws it."""
    from datetime import UTC, datetime, timedelta

    from keybrake.proxy.store import open_store
    from keybrake.proxy.store.records import AuditRecord, Scope
    from keybrake.proxy.ui.runs import cumulative

    url = backend.get("database_url", f"sqlite:///{tmp_path / 'activity.db'}")
    start = datetime(2026, 11, 30, 9, 0, 0, 250000, tzinfo=UTC)

    async def scenario() -> None:
        store = open_store(url)
        await store.open()
        try:
            for n in range(100):  # one call every 7 s for 693 s
                await store.record(
                    AuditRecord(
                        ts=start + timedelta(seconds=7 * n),
                        vendor="stripe",
                        method="POST",
                        path="/v1/payment_intents",
                        status=429 if n % 10 == 9 else 200,
                        decision="budget_cap_hit" if n % 10 == 9 else "forwarded",
                        label=LABEL,
                        caller_tag=f"pod-{n % 3}",
                        settled_micros=0 if n % 10 == 9 else 10_000 + n,
                    )
                )
            await store.record(
                AuditRecord(
                    ts=start,
                    vendor="stripe",
                    method="POST",
                    path="/",
                    status=200,
                    decision="forwarded",
                    label="argo/other",
                    settled_micros=5,
                )
            )
            activity = await store.run_activity(LABEL, None, points=10)
            assert len(activity.seconds) == 10  # 694 s in slices of 70 s
            assert [at for at, *_ in activity.seconds] == [
                datetime(2026, 11, 30, 9, 0, tzinfo=UTC) + timedelta(seconds=70 * i)
                for i in range(10)
            ]
            assert sum(s[2] for s in activity.seconds) == 100
            assert sum(s[3] for s in activity.seconds) == 10
            spent = sum(10_000 + n for n in range(100) if n % 10 != 9)
            assert cumulative(activity).spend[-1].micros == spent
            assert {tag: calls for tag, _, calls, _ in activity.callers} == {
                "pod-0": 34,
                "pod-1": 33,
                "pod-2": 33,
            }
            fine = await store.run_activity(LABEL, None)
            assert len(fine.seconds) == 100  # a short run: one slice per second with calls
            assert (await store.run_activity(LABEL, Scope("team-a/"))).seconds == []
            assert (await store.run_activity("argo/none", None)).seconds == []
        finally:
            await store.close()

    asyncio.run(scenario())


def test_review_findings_stay_fixed(tmp_path: Path, backend: dict[str, Any]) -> None:
    """Crafted cursors, NUL bytes and marks outside a label's alphabet are clear answers (never
    a 500 or a 503); a link from another site hops once to carry the SameSite=Strict cookie; a
    `revoked` in the address says nothing of a live run; a replaced key caps nothing."""
    import base64
    import json

    def token(position: Any) -> str:
        raw = json.dumps({"v": 1, "l": "runs", "p": position}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    with app_client(tmp_path, upstream=Intents(), **backend) as client:
        key = issue(client, agent_run_label=LABEL, daily_usd_cap=None, total_usd_cap=5)
        old = issue(client, agent_run_label=LABEL, daily_usd_cap=None, total_usd_cap=5)
        assert client.delete(f"/vault/keys/{old['key_id']}").status_code == 200
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)
        for bad in (
            token(["0001-01-01T00:00:00+01:00", "x"]),
            token(["9999-12-31T23:59:59-01:00", "x"]),
            base64.urlsafe_b64encode(b"[" * 1000).decode(),
            "A" * 5000,
        ):
            assert client.get("/ui/", params={"continue": bad}).status_code == 400
            assert (
                client.get("/ui/run", params={"label": LABEL, "continue": bad}).status_code == 400
            )
        assert client.get("/ui/", params={"q": "run\x00"}).status_code == 200
        assert client.get("/ui/run", params={"label": "argo/r\x00"}).status_code == 404
        csrf = page_csrf(client.get("/ui/").text)
        nul = client.post("/ui/run/revoke", data={"csrf": csrf, "label": "argo/r\x00"})
        assert nul.status_code == 404
        # Opened from Argo's UI: a page that opens the same address again, from this site.
        hop = client.get(
            f"/ui/run?label={LABEL}",
            headers={"Sec-Fetch-Site": "cross-site"},
            cookies={"keybrake_session": ""},
        )
        assert hop.status_code == 200
        assert f'content="0; url=/ui/run?label={LABEL}"' in hop.text
        page = client.get("/ui/run", params={"label": LABEL, "revoked": "1"}).text
        assert 'id="revoked-notice"' in page  # one of its keys (the replaced one) is revoked
        assert "Revoked: 1 of this run" in page
        # The cap is the live key's $5, not $10 with the revoked one.
        assert re.search(r'id="cap" data-micros="(\d+)"', page).group(1) == "5000000"
        assert key["key_id"] in page


def test_a_database_failure_at_sign_in_is_a_503_page(tmp_path: Path) -> None:
    from keybrake.proxy.app import build_app
    from keybrake.proxy.errors import StoreUnavailable
    from keybrake.proxy.store.sqlite import SQLiteStore
    from tests.inproc import settings

    class SessionsDown(SQLiteStore):
        async def create_session(self, session: Any) -> None:
            raise StoreUnavailable("database is locked")

    store = SessionsDown(str(tmp_path / "down.db"))
    app = build_app(settings(tmp_path), clock=Clock(), store=store)
    with TestClient(app) as client:
        answer = sign_in(client, ADMIN_KEY)
        assert answer.status_code == 503 and "Database unavailable" in answer.text
        assert "keybrake_session" not in answer.headers.get("set-cookie", "")


def test_odd_characters_in_forms_and_tokens(tmp_path: Path, backend: dict[str, Any]) -> None:
    """A non-ASCII CSRF value, a lone surrogate or NUL in a forged `continue` token: a 400, on
    the dashboard and the API, never a 500 or a 503."""
    import base64
    import json

    def token(listing: str, row_id: str) -> str:
        raw = json.dumps({"v": 1, "l": listing, "p": ["2026-11-26T12:00:00Z", row_id]}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    with app_client(tmp_path, **backend) as client:
        for row_id in ("\ud800", "\x00", "x" * 300):
            for listing, path in (("keys", "/vault/keys"), ("budgets", "/vault/budgets")):
                answer = client.get(path, params={"continue": token(listing, row_id)})
                assert answer.status_code == 400, (path, row_id)
        client.headers.pop("Authorization")
        form = client.get("/ui/login")
        odd = client.post("/ui/login", data={"csrf": "é", "token": ADMIN_KEY})
        assert odd.status_code == 400 and form.status_code == 200
        sign_in(client, ADMIN_KEY)
        for row_id in ("\ud800", "\x00"):
            assert client.get("/ui/", params={"continue": token("runs", row_id)}).status_code == 400
        for path in ("/ui/run/revoke", "/ui/logout"):
            assert client.post(path, data={"csrf": "é", "label": LABEL}).status_code == 400


def _svg(page: str, chart_id: str) -> Any:
    import xml.etree.ElementTree as ET

    found = re.search(rf'<svg class="chart" id="{chart_id}".*?</svg>', page, re.S)
    assert found, f"no #{chart_id} in the page"
    return ET.fromstring(found.group(0))


def test_charts_scale_to_their_container_and_keep_their_labels(tmp_path: Path) -> None:
    """Each chart is drawn in a viewBox, with no width in pixels, and every label lies inside
    that viewBox: the last time label of a day-long axis is not cut off at the right edge."""
    clock = Clock()
    with app_client(tmp_path, clock=clock, upstream=Intents()) as client:
        key = issue(client, agent_run_label=LABEL, total_usd_cap=2, expires_in="3d")
        spend(client, key["vault_key"], clock, 3)  # the third call is a cap hit
        clock.advance(hours=30)  # a live run's axis runs to now: labels are dates and times
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)
        page = client.get("/ui/run", params={"label": LABEL}).text
    for chart_id in ("spend-chart", "hits-chart"):
        svg = _svg(page, chart_id)
        assert svg.get("width") in (None, "100%"), "a chart's width is its container's"
        assert svg.get("height") is None
        assert svg.get("preserveAspectRatio") == "xMidYMid meet"
        left, top, width, height = (float(v) for v in svg.get("viewBox").split())
        labels = svg.findall("text")
        assert any(re.fullmatch(r"\d\d-\d\d \d\d:\d\d", t.text or "") for t in labels)
        for text in labels:
            # A generous glyph width for 11 px digits: wider than any of the font's.
            extent = 0.65 * float(text.get("font-size")) * len(text.text or "")
            x, anchor = float(text.get("x")), text.get("text-anchor", "start")
            start = {"start": x, "middle": x - extent / 2, "end": x - extent}[anchor]
            assert left <= start and start + extent <= left + width, (chart_id, text.text, x)
            assert top <= float(text.get("y")) <= top + height, (chart_id, text.text)


def test_a_run_with_key_and_budget_caps_of_every_kind_shows_its_tightest_cap(
    tmp_path: Path,
) -> None:
    """A total-cap key beside 24-hour-cap keys is capped (it used to say "no cap"), on the runs
    page and the run's page, with the cap line drawn on its cumulative spend."""
    clock = Clock()
    with app_client(tmp_path, clock=clock, upstream=Intents()) as client:
        whole = issue(client, agent_run_label=LABEL, daily_usd_cap=None, total_usd_cap=10)
        issue(client, agent_run_label=LABEL, daily_usd_cap=5)
        issue(client, agent_run_label=LABEL, daily_usd_cap=5)
        spend(client, whole["vault_key"], clock, 3)
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)
        runs = client.get("/ui/").text
        page = client.get("/ui/run", params={"label": LABEL}).text
    assert 'data-cap="20000000"' in runs and "keys + keys/24 h" in runs
    assert "15%" in runs and "no cap" not in runs  # $3 of $20
    assert re.search(r'id="cap" data-micros="(\d+)"', page).group(1) == "20000000"
    assert 'id="cap-line"' in page and "cap $20.00 (keys + keys/24 h)" in page


def test_the_calls_filter_by_decision_and_caller(
    tmp_path: Path, backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("keybrake.proxy.ui.dashboard.AUDIT_PER_PAGE", 2)
    clock = Clock()
    with app_client(tmp_path, clock=clock, upstream=Intents(), **backend) as client:
        key = issue(client, agent_run_label=LABEL, daily_usd_cap=None, total_usd_cap=4)
        spend(client, key["vault_key"], clock, 3, tag="pod-a")
        spend(client, key["vault_key"], clock, 3, tag="pod-b")  # the last two: cap hits
        client.headers.pop("Authorization")
        sign_in(client, ADMIN_KEY)

        def calls(**params: str) -> tuple[list[tuple[str, str]], str]:
            page = client.get("/ui/run", params={"label": LABEL, **params})
            assert page.status_code == 200, page.text
            rows = re.findall(r'data-decision="([^"]+)" data-caller-tag="([^"]*)"', page.text)
            return rows, page.text

        everything, page = calls()
        assert len(everything) == 2 and 'id="older-calls"' in page
        assert '<option value="pod-a">pod-a</option>' in page
        assert 'title="POST /v1/payment_intents"' in page  # a cut-off path shows in full
        hits, page = calls(decision="total_cap_hit")
        assert hits == [("total_cap_hit", "pod-b")] * 2 and 'id="older-calls"' not in page
        assert '<option value="total_cap_hit" selected>' in page and 'id="all-calls"' in page
        pod_a, page = calls(caller="pod-a")
        assert pod_a == [("forwarded", "pod-a")] * 2
        # Older calls keep the filter.
        older = re.search(r'href="([^"]+)" id="older-calls"', page).group(1).replace("&amp;", "&")
        assert "caller=pod-a" in older
        rest = re.findall(r'data-caller-tag="([^"]*)"', client.get(older).text)
        assert rest == ["pod-a"]
        both, _ = calls(decision="forwarded", caller="pod-b")
        assert both == [("forwarded", "pod-b")]
        none, page = calls(decision="cap_hit", caller="pod-a")
        assert none == [] and "No calls match." in page
        # An empty field is no filter (the form's "any").
        assert calls(decision="", caller="")[0] == everything
        for bad, says in (
            ({"decision": "bogus"}, "decision is one of: unknown_vendor"),
            ({"decision": "forwarded'; --"}, "decision is one of"),
            ({"caller": "pod\x00a"}, "caller is a caller tag"),
            ({"caller": "p" * 254}, "caller is a caller tag"),
        ):
            answer = client.get("/ui/run", params={"label": LABEL, **bad})
            assert answer.status_code == 400 and says in answer.text, (bad, answer.text[:300])
            assert 'id="sign-out"' in answer.text


def test_every_signed_in_page_has_the_sign_out_button_errors_too(tmp_path: Path) -> None:
    from keybrake.proxy.app import build_app
    from keybrake.proxy.errors import StoreUnavailable
    from keybrake.proxy.store.sqlite import SQLiteStore
    from tests.inproc import settings

    class Flaky(SQLiteStore):
        down = False

        async def list_runs(self, query: Any, now: Any) -> Any:
            if self.down:
                raise StoreUnavailable("database is locked")
            return await super().list_runs(query, now)

    store = Flaky(str(tmp_path / "flaky.db"))
    app = build_app(settings(tmp_path), clock=Clock(), store=store, upstream=Intents())
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        issue(client, agent_run_label=LABEL)
        client.headers.pop("Authorization")
        form = client.get("/ui/login")
        assert 'id="sign-out"' not in form.text  # nobody is signed in yet
        sign_in(client, ADMIN_KEY)
        csrf = page_csrf(client.get("/ui/").text)
        pages = {
            "/ui/run?label=argo/none": 404,
            "/ui/?status=bogus": 400,
            f"/ui/run?label={LABEL}&continue=x": 400,
            f"/ui/run?label={LABEL}&decision=bogus": 400,
            f"/ui/run/revoke?label={LABEL}": 200,
        }
        answers = {path: client.get(path) for path in pages}
        answers["POST /ui/run/revoke"] = client.post("/ui/run/revoke", data={"csrf": "0" * 64})
        pages["POST /ui/run/revoke"] = 400
        store.down = True
        answers["/ui/ (database down)"] = client.get("/ui/")
        pages["/ui/ (database down)"] = 503
        store.down = False
        for path, status in pages.items():
            answer = answers[path]
            assert answer.status_code == status, (path, answer.text[:300])
            assert 'action="/ui/logout"' in answer.text and 'id="sign-out"' in answer.text, path
            assert page_csrf(answer.text) == csrf, path
        # The error page's button signs out.
        out = client.post("/ui/logout", data={"csrf": page_csrf(answers[path].text)})
        assert out.status_code == 200 and 'id="token"' in out.text
        assert client.get("/ui/", follow_redirects=False).status_code == 303
