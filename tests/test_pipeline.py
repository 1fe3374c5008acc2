"""The request path in-process, behind the `upstream=` seam: no sockets, an injectable clock,
and the vendor's side under the test's control."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keybrake.proxy.app import build_app
from keybrake.proxy.errors import StoreUnavailable
from keybrake.proxy.pipeline import Reply
from keybrake.proxy.settings import Settings
from keybrake.proxy.store.records import Settlement
from keybrake.proxy.store.sqlite import SQLiteStore
from keybrake.proxy.upstream import UpstreamResponse
from tests.inproc import Clock, StubUpstream
from tests.inproc import settings as proxy_settings
from tests.proxyproc import ADMIN_KEY

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ISSUE = {
    "vendor": "stripe",
    "daily_usd_cap": 10,
    "allowed_endpoints": ["POST /v1/payment_intents"],
    "expires_in": "2h",
    "agent_run_label": "argo/inproc",
}


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, upstream: StubUpstream, **kwargs: Any
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with its lifespan (store, sweeper, upstream) running, and a client in-process."""
    app = build_app(proxy_settings(tmp_path), clock=Clock(), upstream=upstream, **kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://keybrake",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as client:
            yield app, client


async def charge(client: httpx.AsyncClient, vault_key: str, body: str) -> httpx.Response:
    return await client.post(
        "/stripe/v1/payment_intents",
        content=body.encode(),
        headers={"Authorization": f"Bearer {vault_key}", **FORM},
    )


async def one_charge(
    tmp_path: Path, upstream: StubUpstream, **kwargs: Any
) -> tuple[httpx.Response, list[dict[str, Any]], dict[str, Any]]:
    """A key issued, one $3 charge with it: the reply, the audit rows and the key after."""
    async with running(tmp_path, upstream, **kwargs) as (_, client):
        key = (await client.post("/vault/keys", json=ISSUE)).json()
        reply = await charge(client, key["vault_key"], "amount=300&currency=usd")
        rows = (await client.get("/vault/audit")).json()["data"]
        info = (await client.get(f"/vault/keys/{key['key_id']}")).json()
    return reply, rows, info


def test_a_call_at_the_vendor_completes_when_its_client_goes_away(tmp_path: Path) -> None:
    """A client that hung up mid-call (or a server cancelling the request's task, as some do on
    disconnect and uvicorn does at the end of a graceful shutdown) cancelled the vendor call: the
    audit row said `upstream_error`, the real outcome and request id were lost."""

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        upstream = StubUpstream()
        async with running(tmp_path, upstream) as (app, client):
            key = (await client.post("/vault/keys", json=ISSUE)).json()
            assert upstream.gate is not None and upstream.arrived is not None
            upstream.gate.clear()
            call = asyncio.create_task(charge(client, key["vault_key"], "amount=100&currency=usd"))
            await upstream.arrived.wait()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            upstream.gate.set()
            await app.forward.pipeline.drain()
            rows = (await client.get("/vault/audit")).json()["data"]
            info = (await client.get(f"/vault/keys/{key['key_id']}")).json()
            return rows, info

    rows, info = asyncio.run(scenario())
    assert [(r["decision"], r["status"], r["vendor_request_id"]) for r in rows] == [
        ("forwarded", 200, "req_stub")
    ]
    assert (info["spent_usd"], info["reserved_usd"]) == ("1.00", "0.00")


def test_an_admitted_call_cancelled_before_it_starts_does_not_leave_its_request_waiting(
    tmp_path: Path,
) -> None:
    """The admitted part of a call runs in a task of its own that hands its outcome to the
    request; a task cancelled before its first step (as a shutdown cancelling every task does)
    never runs that hand-over, and the request waited for it forever."""

    async def scenario() -> bool:
        async with running(tmp_path, StubUpstream()) as (app, _):
            pipeline = app.forward.pipeline
            ran = False

            async def work() -> Reply:
                nonlocal ran
                ran = True
                return Reply(200, [], b"")

            request = asyncio.create_task(pipeline._uncancellable(work()))
            for _ in range(100):  # the request's first step creates the call's task
                if pipeline._admitted:
                    break
                await asyncio.sleep(0)  # a turn of the loop, not a wait
            else:
                pytest.fail("the admitted call's task was never created")
            (admitted,) = pipeline._admitted
            admitted.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(request, timeout=10)  # a guard: it used to hang here
            await pipeline.drain()
            return ran

    assert asyncio.run(scenario()) is False


class BrokenUpstream(StubUpstream):
    async def respond(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> UpstreamResponse:
        raise ValueError("a bug on the way out")


def test_a_bug_while_forwarding_settles_the_call_as_unanswered(tmp_path: Path) -> None:
    """An error other than the upstream's own after the reservation fell to the catch-all: a
    second audit row said `internal_error` (not forwarded) while the first stayed in flight."""

    reply, rows, info = asyncio.run(one_charge(tmp_path, BrokenUpstream()))
    assert reply.status_code == 502 and "Traceback" not in reply.text
    assert [r["decision"] for r in rows] == ["upstream_error"]
    assert (info["spent_usd"], info["reserved_usd"]) == ("3.00", "0.00")  # it may have moved


class SettleFails(SQLiteStore):
    async def settle(self, settlement: Settlement) -> None:
        raise StoreUnavailable("database write failed: disk I/O error")


def test_a_settle_that_fails_says_the_call_was_forwarded(tmp_path: Path) -> None:
    """It answered "no call was forwarded" (so retrying looked safe) for a call that was."""

    store = SettleFails(tmp_path / "inproc.db")
    reply, rows, info = asyncio.run(one_charge(tmp_path, StubUpstream(), store=store))
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert error["code"] == "keybrake_outcome_not_recorded"
    assert "was forwarded" in error["message"] and "req_stub" in error["message"]
    assert reply.headers["stripe-should-retry"] == "false"
    # The reservation stays counted until the sweep reconciles it.
    assert [r["decision"] for r in rows] == ["in_flight"]
    assert (info["spent_usd"], info["reserved_usd"]) == ("0.00", "3.00")


def test_a_vendor_replay_costs_nothing(tmp_path: Path) -> None:
    replayed = UpstreamResponse(
        200,
        [("request-id", "req_again"), ("idempotent-replayed", "true")],
        b'{"id": "pi_first", "object": "payment_intent"}',
    )

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with running(tmp_path, StubUpstream(replayed)) as (_, client):
            key = (await client.post("/vault/keys", json=ISSUE)).json()
            assert (await charge(client, key["vault_key"], "amount=300&currency=usd")).is_success
            rows = (await client.get("/vault/audit")).json()["data"]
            info = (await client.get(f"/vault/keys/{key['key_id']}")).json()
        return rows, info

    rows, info = asyncio.run(scenario())
    assert [(r["decision"], r["settled_usd"]) for r in rows] == [("vendor_replayed", "0.00")]
    assert info["spent_usd"] == "0.00"


# -- no input makes a 500 ------------------------------------------------------------------------

_segment = st.one_of(
    st.sampled_from(
        [
            "v1",
            "payment_intents",
            "refunds",
            "charges",
            "pi_1",
            "ch_1",
            "confirm",
            "capture",
            "",
            ".",
            "..",
            "%2e",
            "%2F",
            "a%00",
            "v2",
            "customers",
        ]
    ),
    st.text(min_size=0, max_size=12),
)
_headers = st.fixed_dictionaries(
    {},
    optional={
        "content-type": st.sampled_from(
            [
                "application/x-www-form-urlencoded",
                "application/json",
                "text/plain",
                "application/x-www-form-urlencoded; charset=utf-8; x=1",
                "multipart/form-data",
                "",
            ]
        ),
        "stripe-account": st.text(max_size=20),
        "stripe-context": st.text(max_size=20),
        "idempotency-key": st.text(max_size=40),
        "content-encoding": st.sampled_from(["gzip", "identity", ""]),
    },
)
_body = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "amount",
                    "currency",
                    "charge",
                    "payment_intent",
                    "amount_to_capture",
                    "metadata[x]",
                    "[amount]",
                    "transfer_data[amount]",
                    "To",
                    "to",
                    "Body",
                ]
            ),
            st.text(max_size=12),
        ),
        max_size=6,
    ).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode()),
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=5), children, max_size=3)
        ),
        max_leaves=8,
    ).map(lambda value: repr(value).encode()),
)


@pytest.fixture(scope="module")
def fresh_settings(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Settings]:
    """Settings for an app on a database of its own, made once: each example's database is a
    copy of an empty one the store has migrated (the app still opens and migrates it, finding
    nothing to do), instead of the settings being read and the schema built again every time."""
    folder = tmp_path_factory.mktemp("examples")
    template = folder / "migrated.db"
    SQLiteStore(template).migrate()
    base = proxy_settings(folder)

    def make() -> Settings:
        database = folder / f"{uuid.uuid4().hex}.db"
        shutil.copyfile(template, database)
        return base.model_copy(update={"database_url": f"sqlite:///{database}"})

    return make


@settings(
    max_examples=150,
    derandomize=True,  # the same examples every run: a test, not a lottery
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
    segments=st.lists(_segment, min_size=1, max_size=4),
    query=st.sampled_from(["", "expand[]=x", "amount=1", "a=%ZZ"]),
    headers=_headers,
    body=_body,
)
def test_no_vendor_call_input_is_answered_with_a_500(
    fresh_settings: Callable[[], Settings],
    method: str,
    segments: list[str],
    query: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    from urllib.parse import quote

    path = "/stripe/" + "/".join(quote(s, safe="%.") for s in segments)

    async def scenario() -> tuple[int, int]:
        upstream = StubUpstream()  # each example its own database
        app = build_app(fresh_settings(), clock=Clock(), upstream=upstream)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://k") as client:
                admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
                key = await client.post(
                    "/vault/keys",
                    headers=admin,
                    json={
                        **ISSUE,
                        "allowed_endpoints": ["* /v1/*", "* /v1/*/*", "* /v1/*/*/*", "* /v2/*"],
                        "allowed_accounts": ["*"],
                    },
                )
                sent = {k: v for k, v in headers.items() if v.isprintable() and v.isascii()}
                sent["Authorization"] = f"Bearer {key.json()['vault_key']}"
                reply = await client.request(
                    method, path + (f"?{query}" if query else ""), headers=sent, content=body
                )
                rows = (await client.get("/vault/audit", headers=admin)).json()["data"]
                return reply.status_code, len(rows)

    status, audited = asyncio.run(scenario())
    assert status < 500 or status == 502, status  # 502: a lookup the stub could not answer
    # Every vendor call is audited. httpx resolves dot segments first (`/stripe/.` is `/stripe`,
    # no vendor call; `/stripe/../v1/x` a call to a vendor named v1).
    first, slash, _ = httpx.URL("http://k" + path).path[1:].partition("/")
    vendor_call = bool(slash and first) and first not in {"vault", "healthz", "readyz", "metrics"}
    assert audited == (1 if vendor_call else 0)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"vendor": "stripe", "vendor": "twilio"}',
        b'{"daily_usd_cap": NaN}',
    ],
)
def test_admin_json_that_parsers_read_differently_is_a_400(tmp_path: Path, payload: bytes) -> None:
    async def scenario() -> httpx.Response:
        async with running(tmp_path, StubUpstream()) as (_, client):
            return await client.post(
                "/vault/keys", content=payload, headers={"Content-Type": "application/json"}
            )

    reply = asyncio.run(scenario())
    assert reply.status_code == 400
    assert "malformed JSON" in reply.json()["error"]["message"]
