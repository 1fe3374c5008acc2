"""End to end, for real: the rendered templates' steps run as processes against the real proxy
app (fixture `proxy_server`: served from a thread of the test, upstream localstripe) — the issue
script, then N fan-out pods as concurrent processes using the real Stripe SDK with exactly the
environment the template gives them, then the exit handler — for a succeeded run, a failed run, a
run whose cap is hit, and runs whose issue step failed. Afterwards the key is revoked, the audit
rows carry the pod tags, and spend never passed the cap. The pods being processes is the point:
these are end-to-end tests (tests/e2e/)."""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from argocheck.simulator import Run, Simulator
from hera.workflows import DAG, Workflow

from keybrake.hera_workflows import DEFAULT_PROXY_URL, fan_out, issue_vault_key, revoke_on_exit
from tests.fakes.kubernetes import FakeCluster
from tests.fakes.resend_upstream import FakeResend
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.twilio_upstream import FakeTwilio
from tests.helpers import localstripe_intents
from tests.proxyproc import Localstripe
from tests.served import ServedProxy, serve_proxy
from tests.vendor_helpers import vendor_env

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.vendor_fixtures"]  # the vendor fakes (fake_twilio, fake_resend)

HERE = Path(__file__).resolve().parents[2] / "hera"  # its pods
CHARGE = [sys.executable, str(HERE / "pods" / "charge_batch.py")]
ORDER_AGENT = [sys.executable, str(HERE / "pods" / "order_agent.py")]
IMAGE = "ghcr.io/acme/charge-batch:1"
FANOUT = "workflowtemplates/keybrake-fanout.yaml"


def bind_workflow_namespace(proxy: ServedProxy) -> None:
    """What the platform engineer does once: the issue steps of namespace argo, running as
    keybrake-issuer, log in as an issuer of argo/... labels. No token goes to the namespace."""
    admin(
        proxy,
        "POST",
        "/vault/issuers",
        json={
            "name": "argo-workflows",
            "label_prefix": "argo/",
            "max_daily_usd_cap": 1000,
            "kubernetes": {"namespaces": ["argo"], "service_accounts": ["keybrake-issuer"]},
        },
    )


@pytest.fixture
def proxy_server(
    tmp_path: Path, localstripe: Localstripe, cluster: FakeCluster
) -> Iterator[ServedProxy]:
    """The proxy app with localstripe upstream and Kubernetes login against the fake cluster,
    its issuer bound to the workflow namespace."""
    proxy = serve_proxy(
        tmp_path / "proxy",
        stripe_base=localstripe.url,
        extra_env=cluster.proxy_login_settings(tmp_path / "proxy"),
    )
    bind_workflow_namespace(proxy)
    yield proxy
    proxy.stop()


@pytest.fixture
def vendor_proxy(
    tmp_path: Path,
    fake_stripe: FakeStripe,
    fake_twilio: FakeTwilio,
    fake_resend: FakeResend,
    cluster: FakeCluster,
) -> Iterator[ServedProxy]:
    """The app with all three vendors on fakes, Kubernetes login as `proxy_server`'s."""
    login = cluster.proxy_login_settings(tmp_path / "proxy")
    proxy = serve_proxy(
        tmp_path / "proxy",
        stripe_base=fake_stripe.url,
        extra_env={**vendor_env(fake_twilio, fake_resend), **login},
    )
    bind_workflow_namespace(proxy)
    yield proxy
    proxy.stop()


def admin(proxy: ServedProxy, method: str, path: str, **options: Any) -> Any:
    headers = {"Authorization": f"Bearer {proxy.admin_key}"}
    response = httpx.request(method, proxy.url + path, headers=headers, timeout=30, **options)
    assert response.status_code < 300, response.text
    return response.json()


def run_fanout(
    proxy: ServedProxy,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
    items: list[dict[str, Any]],
    budget: str,
    **options: Any,
) -> Run:
    cluster = options.pop("cluster")
    document = next(
        d
        for d in catalog
        if d["kind"] == "WorkflowTemplate" and d["metadata"]["name"] == "keybrake-fanout"
    )
    sim = Simulator(
        catalog,
        workdir=tmp_path / "run",
        cluster=cluster,
        entrypoints={IMAGE: CHARGE},
        name="billing-run",
        **options.pop("simulator", {}),
    )
    parameters = {
        "items": json.dumps(items),
        "image": IMAGE,
        "budget_usd": budget,
        "proxy_url": proxy.url,
        **options,
    }
    return sim.run(document, parameters)


def key_of(proxy: ServedProxy, run: Run) -> dict[str, Any]:
    info: dict[str, Any] = admin(proxy, "GET", f"/vault/keys/{run.outputs['keybrake_key_id']}")
    return info


def audit(proxy: ServedProxy, key_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = admin(
        proxy, "GET", "/vault/audit", params={"key_id": key_id, "limit": 1000}
    )["data"]
    return rows


def caller_tags(run: Run, template: str = "run-pod") -> set[str]:
    """What each pod's calls are tagged with: its item's identity (which Argo's retries of the
    item keep, so a per-pod cap holds across them), then the pod's own name (for the audit)."""
    return {
        f"{hashlib.sha256(pod.env['KEYBRAKE_ITEM'].encode()).hexdigest()[:12]}@{pod.name}"
        for pod in run.pods_of(template)
    }


def attempts_per_item(run: Run) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pod in run.pods_of("run-pod"):
        counts[pod.env["KEYBRAKE_ITEM"]] = counts.get(pod.env["KEYBRAKE_ITEM"], 0) + 1
    return counts


def test_a_succeeded_run(
    proxy_server: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    items = [{"charges": 2, "cents": 100, "batch": n} for n in range(4)]
    run = run_fanout(proxy_server, catalog, tmp_path, cluster=cluster, items=items, budget="300")

    assert run.phase == "Succeeded", [p.stderr for p in run.pods]
    key = key_of(proxy_server, run)
    assert key["status"] == "revoked"
    assert key["agent_run_label"] == "argo/billing-run"
    assert key["metadata"] == {
        "workflow": "billing-run",
        "namespace": "argo",
        "uid": "0b6a1f57-2d8e-4e5e-9c55-6c3b0e6b1d01",
        "cluster": "default",
    }
    assert Decimal(key["spent_usd"]) == Decimal("8.00") and key["calls"] == 8
    rows = audit(proxy_server, key["key_id"])
    assert len(rows) == 8 and {r["decision"] for r in rows} == {"forwarded"}
    assert {r["caller_tag"] for r in rows} == caller_tags(run)  # every pod, tagged
    assert run.outputs["keybrake_spend_summary"] == (
        f"keybrake: key {key['key_id']} revoked: spent $8.00 of $300.00 cap, 8 calls, "
        "0 cap hits (workflow Succeeded)"
    )
    # Issued by the namespace's service account (its token, no secret), for that namespace...
    assert (key["namespace"], key["service_account"]) == ("argo", "keybrake-issuer")
    # ...into a Secret of the run that the pods read: the Workflow never held the key.
    [(namespace, name)] = cluster.secrets
    vault_key = cluster.secret_value(namespace, name, "vault_key")
    assert all(
        pod.env["STRIPE_SECRET_KEY"].startswith(vault_key + ".") for pod in run.pods_of("run-pod")
    )
    workflow_object = json.dumps(
        [run.globals, parameters_of(run.entry), run.exit_handler.parameters]
    )
    assert vault_key not in workflow_object
    # The fan-out pods run as keybrake-workload, which gets no keybrake token.
    assert all("KEYBRAKE_TOKEN_FILE" not in pod.env for pod in run.pods_of("run-pod"))


def test_argo_retry_of_a_finished_run_is_refused_with_a_clear_message(
    proxy_server: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """`argo retry` keeps the succeeded issue step and re-runs the failed items, but the exit
    handler already revoked the run's key: each retried item is refused with a message that says
    to `argo resubmit`, nothing is charged, and the key stays revoked."""
    fixed = tmp_path / "bug-fixed"
    items = [{"charges": 1, "batch": "ok"}, {"charges": 1, "crash_unless": str(fixed)}]
    document = next(
        d
        for d in catalog
        if d["kind"] == "WorkflowTemplate" and d["metadata"]["name"] == "keybrake-fanout"
    )
    sim = Simulator(catalog, workdir=tmp_path / "run", cluster=cluster, entrypoints={IMAGE: CHARGE})
    parameters = {
        "items": json.dumps(items),
        "image": IMAGE,
        "budget_usd": "50",
        "proxy_url": proxy_server.url,
    }
    first = sim.run(document, parameters)
    assert first.phase == "Failed"
    key = key_of(proxy_server, first)
    assert key["status"] == "revoked" and key["calls"] == 1
    pods_before = len(sim.pods)

    fixed.write_text("the operator fixed the bug, then ran `argo retry`")
    retried = sim.retry(document, first)

    new_pods = sim.pods[pods_before:]
    assert [p.template for p in new_pods] == ["run-pod", "keybrake-revoke"]  # no new issue
    [refused] = [p for p in new_pods if p.template == "run-pod"]
    assert refused.exit_code == 77  # keybrake's refusal: not retried by the retryStrategy
    assert "argo resubmit" in refused.stderr and "revoked" in refused.stderr
    assert retried.phase == "Failed"
    again = key_of(proxy_server, retried)
    assert again["status"] == "revoked"
    assert again["total_spent_usd"] == key["total_spent_usd"]  # nothing charged
    refusal = audit(proxy_server, key["key_id"])[0]  # newest first
    assert refusal["decision"] == "revoked" and refusal["caller_tag"].endswith(refused.name)
    assert retried.outputs["keybrake_key_id"] == key["key_id"]


def parameters_of(node: Any) -> list[Any]:
    """Every node's output parameters and result: what Argo keeps in the Workflow status."""
    found = [node.parameters, node.result]
    for child in node.children:
        found += parameters_of(child)
    return found


def test_a_failed_run_still_revokes(
    proxy_server: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    items = [{"charges": 1, "cents": 100}, {"crash": True}]
    run = run_fanout(proxy_server, catalog, tmp_path, cluster=cluster, items=items, budget="300")

    assert run.phase == "Failed"
    assert attempts_per_item(run)[json.dumps({"crash": True})] == 4  # transient: retried 3 times
    assert run.exit_handler is not None and run.exit_handler.phase == "Succeeded"
    key = key_of(proxy_server, run)
    assert key["status"] == "revoked"
    assert run.outputs["keybrake_spend_summary"].endswith("1 call, 0 cap hits (workflow Failed)")


def test_a_run_whose_cap_is_hit(
    proxy_server: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    items = [{"charges": 3, "cents": 150, "batch": n} for n in range(5)]  # $22.50 wanted
    run = run_fanout(proxy_server, catalog, tmp_path, cluster=cluster, items=items, budget="10")

    assert run.phase == "Failed"
    refused = [pod for pod in run.pods_of("run-pod") if pod.exit_code == 77]
    assert refused and all("cap hit" in pod.stderr for pod in refused)
    assert set(attempts_per_item(run).values()) == {1}  # a cap hit is never retried
    key = key_of(proxy_server, run)
    assert key["status"] == "revoked"
    assert Decimal(key["spent_usd"]) <= Decimal("10") and key["cap_hits"] >= 1
    rows = audit(proxy_server, key["key_id"])
    settled = sum(Decimal(r["settled_usd"] or "0") for r in rows)
    assert settled == Decimal(key["spent_usd"]) <= Decimal("10")
    assert {r["caller_tag"] for r in rows} <= caller_tags(run)
    assert any(r["decision"] != "forwarded" for r in rows)
    assert f"{key['cap_hits']} cap hit" in run.outputs["keybrake_spend_summary"]
    # after the run, the key is dead: a pod's environment no longer works
    env = refused[0].env
    result = httpx.post(
        env["STRIPE_BASE_URL"] + "/v1/payment_intents",
        headers={"Authorization": f"Bearer {env['STRIPE_SECRET_KEY']}"},
        data={"amount": 100, "currency": "usd"},
        timeout=30,
    )
    assert result.status_code == 401


def test_a_retried_item_keeps_its_per_pod_cap(
    proxy_server: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    # The flaky item charges $6 and crashes; Argo retries it in a new pod, which may only add
    # $4 more under max_usd_per_pod=10: $3, then a cap hit (exit 77, not retried again). Were
    # the retry a fresh caller, it would charge $6 again. The steady item is its own caller.
    flaky = {"charges": 2, "cents": 300, "crash_after": True}
    steady = {"charges": 2, "cents": 300}
    run = run_fanout(
        proxy_server,
        catalog,
        tmp_path,
        [flaky, steady],
        budget="100",
        max_usd_per_pod="10",
        cluster=cluster,
    )

    assert run.phase == "Failed"
    assert attempts_per_item(run) == {json.dumps(flaky): 2, json.dumps(steady): 1}
    key = key_of(proxy_server, run)
    assert Decimal(key["max_usd_per_caller"]) == 10
    rows = audit(proxy_server, key["key_id"])
    assert {r["caller_tag"] for r in rows} == caller_tags(run)  # the audit names each pod
    spent: dict[str, Decimal] = {}
    pods: dict[str, set[str]] = {}
    for row in rows:
        item, _, pod = row["caller_tag"].partition("@")
        spent[item] = spent.get(item, Decimal(0)) + Decimal(row["settled_usd"] or "0")
        pods.setdefault(item, set()).add(pod)
    flaky_id = hashlib.sha256(json.dumps(flaky).encode()).hexdigest()[:12]
    steady_id = hashlib.sha256(json.dumps(steady).encode()).hexdigest()[:12]
    assert spent == {flaky_id: Decimal("9.00"), steady_id: Decimal("6.00")}
    assert (len(pods[flaky_id]), len(pods[steady_id])) == (2, 1)
    assert [r["decision"] for r in rows].count("caller_cap_hit") == 1
    assert Decimal(key["total_spent_usd"]) == Decimal("15.00")


def test_a_run_whose_issue_step_was_refused(
    proxy_server: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    run = run_fanout(
        proxy_server,
        catalog,
        tmp_path,
        [{"charges": 1}],
        budget="10",
        expires_in="30d",
        cluster=cluster,
    )

    assert run.phase == "Failed"
    [issue] = run.pods_of("keybrake-issue")  # a 4xx: exit 77, not retried
    assert issue.exit_code == 77 and "expires_in" in issue.stderr
    assert run.pods_of("run-pod") == []
    assert "keybrake_key_id" not in run.outputs
    summary = run.outputs["keybrake_spend_summary"]
    assert "no id and nothing active labelled argo/billing-run" in summary
    listed = admin(proxy_server, "GET", "/vault/keys", params={"label": "argo/billing-run"})["data"]
    assert listed == []


def test_keys_of_an_issue_step_that_crashed_after_issuing_are_revoked(
    proxy_server: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    run = run_fanout(
        proxy_server,
        catalog,
        tmp_path,
        [{"charges": 1}],
        budget="10",
        simulator={"broken_tmp": frozenset({"keybrake-issue"})},
        cluster=cluster,
    )

    assert run.phase == "Failed"
    assert len(run.pods_of("keybrake-issue")) == 3  # exit 1: retried twice
    listed = admin(proxy_server, "GET", "/vault/keys", params={"label": "argo/billing-run"})["data"]
    # Each retry replaced the key before it (one request id); the exit handler took the last.
    assert len(listed) == 3 and {k["status"] for k in listed} == {"revoked"}
    assert "revoked 1 key(s) labelled argo/billing-run" in run.outputs["keybrake_spend_summary"]


def test_a_retried_issue_step_leaves_exactly_one_live_key(
    proxy_server: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The first attempt issues a key and stores it in a Secret, then dies before Argo collects
    its outputs; the retry gets a fresh key (the first is revoked at once) and a Secret of its
    own, and the run goes on with it."""
    seen: list[list[str]] = []

    def live_keys() -> list[str]:
        data = admin(proxy_server, "GET", "/vault/keys", params={"status": "active"})["data"]
        return [k["key_id"] for k in data]

    run = run_fanout(
        proxy_server,
        catalog,
        tmp_path,
        [{"charges": 2, "cents": 100, "batch": "x"}],
        budget="10",
        simulator={"flaky_tmp": {"keybrake-issue": 1}},
        cluster=cluster,
    )
    seen.append(live_keys())

    assert run.phase == "Succeeded", [p.stderr for p in run.pods]
    assert len(run.pods_of("keybrake-issue")) == 2
    listed = admin(proxy_server, "GET", "/vault/keys", params={"label": "argo/billing-run"})["data"]
    first, second = sorted(listed, key=lambda k: k["created_at"])
    assert first["total_spent_usd"] == "0.00" and second["total_spent_usd"] == "2.00"
    assert seen == [[]]  # both revoked now; during the run only the second was ever used
    names = sorted(name for (_, name) in cluster.secrets)
    assert len(names) == 2 and names[1] == names[0] + "-2"
    events = admin(proxy_server, "GET", "/vault/events", params={"action": "key.issue"})["data"]
    assert [e["target"] for e in reversed(events)] == [first["key_id"], second["key_id"]]
    assert events[0]["actor"].startswith("argo/keybrake-issuer via issuer ")


def test_the_billing_agent_example(
    proxy_server: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    example = next(d for d in catalog if d["metadata"].get("generateName") == "billing-agent-")
    document = json.loads(json.dumps(example).replace(DEFAULT_PROXY_URL, proxy_server.url))
    sim = Simulator(
        catalog,
        workdir=tmp_path,
        cluster=cluster,
        commands={"billing-agent": CHARGE},
        name="billing-agent-x7k2p",
    )
    batches = [{"charges": 2, "cents": 2500, "batch": "eu"}, {"charges": 1, "cents": 4000}]
    run = sim.run(document, {"batches": json.dumps(batches)})

    assert run.phase == "Succeeded", [p.stderr for p in run.pods]
    key = key_of(proxy_server, run)
    assert key["status"] == "revoked" and Decimal(key["spent_usd"]) == Decimal("90.00")
    assert key["max_usd_per_call"] is not None and Decimal(key["max_usd_per_call"]) == 50
    rows = audit(proxy_server, key["key_id"])
    assert {r["caller_tag"] for r in rows} == caller_tags(run, "charge-pod")


def notify_workflow(vendor: str, endpoint: str, image: str, items: list[str]) -> dict[str, Any]:
    with Workflow(name=f"notify-{vendor}", entrypoint="main") as workflow:
        with DAG(name="main"):
            key = issue_vault_key(vendor=vendor, daily_usd_cap=1, allowed_endpoints=[endpoint])
            fan_out(key, "send", image=image, with_items=items)
        revoke_on_exit(workflow, key)
    document: dict[str, Any] = workflow.to_dict()
    return document


@pytest.mark.parametrize(
    ("vendor", "endpoint", "program", "items"),
    [
        ("resend", "POST /emails", "send_email.py", ["ann", "bob", "cid"]),
        ("twilio", "POST /2010-04-01/Accounts/*/Messages.json", "send_sms.py", ["+14155550100"]),
    ],
)
def test_resend_and_twilio_pods_need_only_the_template_environment(
    vendor_proxy: ServedProxy,
    cluster: FakeCluster,
    catalog: list[dict[str, Any]],
    tmp_path: Path,
    vendor: str,
    endpoint: str,
    program: str,
    items: list[str],
) -> None:
    image = f"example.test/{vendor}-notifier:1"
    document = notify_workflow(vendor, endpoint, image, items)
    document = json.loads(json.dumps(document).replace(DEFAULT_PROXY_URL, vendor_proxy.url))
    sim = Simulator(
        catalog,
        workdir=tmp_path,
        cluster=cluster,
        entrypoints={image: [sys.executable, str(HERE / "pods" / program)]},
        name=f"notify-{vendor}",
    )
    run = sim.run(document)

    assert run.phase == "Succeeded", [p.stderr for p in run.pods]
    key = key_of(vendor_proxy, run)
    assert key["status"] == "revoked" and key["vendor"] == vendor
    rows = audit(vendor_proxy, key["key_id"])
    assert [r["decision"] for r in rows] == ["forwarded"] * len(items)
    assert {r["caller_tag"] for r in rows} == caller_tags(run, "send-pod")
    spent = Decimal(key["spent_usd"])
    assert 0 < spent <= 1
    assert f"spent ${spent.normalize():f}" in run.outputs["keybrake_spend_summary"]


def test_the_order_agent_example_holds_one_budget_across_stripe_and_resend(
    tmp_path: Path,
    catalog: list[dict[str, Any]],
    localstripe: Localstripe,
    fake_twilio: FakeTwilio,
    fake_resend: FakeResend,
    cluster: FakeCluster,
) -> None:
    """The multi-vendor example as rendered: a $90.005 run budget, a Stripe key and a Resend
    key drawing on it, four orders of a $30 charge and three $0.0009 receipts each ($120.0108
    wanted), both fan-outs at once. Whatever the interleaving, what localstripe and the Resend
    fake hold together never passes the budget, and the exit handler revokes it all."""
    login = cluster.proxy_login_settings(tmp_path / "proxy")
    proxy = serve_proxy(
        tmp_path / "proxy",
        stripe_base=localstripe.url,
        extra_env={**vendor_env(fake_twilio, fake_resend), **login},
    )
    bind_workflow_namespace(proxy)
    try:
        example = next(d for d in catalog if d["metadata"].get("generateName") == "order-agent-")
        document = json.loads(json.dumps(example).replace(DEFAULT_PROXY_URL, proxy.url))
        sim = Simulator(
            catalog,
            workdir=tmp_path / "run",
            cluster=cluster,
            commands={"order-agent": ORDER_AGENT},
            name="order-agent-q4w8z",
        )
        tag = uuid.uuid4().hex
        orders = [{"order": f"o-{n}", "cents": 3000, "emails": 3, "run": tag} for n in range(4)]
        run = sim.run(document, {"orders": json.dumps(orders), "budget_usd": "90.005"})

        budget_id = run.outputs["keybrake_budget_id"]
        budget = admin(proxy, "GET", f"/vault/budgets/{budget_id}")
        rows = admin(proxy, "GET", "/vault/audit", params={"budget_id": budget_id, "limit": 1000})
        keys_of_budget = admin(proxy, "GET", "/vault/keys", params={"budget_id": budget_id})["data"]
    finally:
        proxy.stop()

    assert run.phase == "Failed"  # some pods were refused (exit 77), as they should be
    refused = [p for p in run.pods_of("charge-pod") + run.pods_of("receipt-pod") if p.exit_code]
    assert refused and {p.exit_code for p in refused} == {77}
    assert all("cap hit" in p.stderr for p in refused)
    charged = len(localstripe_intents(localstripe.url, run=tag))
    emailed = sum(1 for e in fake_resend.emails.values() if "for order o-" in e["subject"])
    moved = Decimal(30) * charged + Decimal("0.0009") * emailed
    assert charged >= 1 and emailed >= 1
    assert moved <= Decimal("90.005")  # the two vendors together, within the run's budget
    assert Decimal(budget["total_spent_usd"]) == moved
    assert budget["status"] == "revoked"
    keys = [info for info in keys_of_budget if info["key_id"] in budget["keys"]]
    assert len(budget["keys"]) == len(keys) == 2
    assert {k["vendor"] for k in keys} == {"stripe", "resend"}
    assert {k["status"] for k in keys} == {"revoked"}
    assert {r["budget_id"] for r in rows["data"]} == {budget_id}
    assert any(r["decision"] == "budget_cap_hit" for r in rows["data"])
    assert run.outputs["keybrake_spend_summary"] == (
        f"keybrake: budget {budget_id} revoked with its 2 key(s): spent ${moved.normalize():f} "
        f"of $90.005 cap, {len(rows['data'])} calls, {len(refused)} cap hits (workflow Failed)"
    )
