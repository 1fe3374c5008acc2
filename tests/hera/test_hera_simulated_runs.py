"""The rendered templates, executed: each pod's command runs as a local process with exactly the
environment the template gives it (argocheck.simulator), against a stand-in proxy (fake_keybrake).
The end-to-end runs against the real proxy and localstripe are in
tests/e2e/hera/test_hera_live_runs.py."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from argocheck.semantics import Catalog, problems
from argocheck.simulator import Pod, Run, Simulator
from fake_keybrake import FakeKeybrake, serve
from hera.workflows import DAG, Workflow
from ruamel.yaml import YAML

from keybrake.adopt.wrap import WrapOptions, wrap_text
from keybrake.hera_workflows import (
    SharedTemplates,
    fan_out,
    issue_budget,
    issue_vault_key,
    revoke_on_exit,
)
from tests.fakes.kubernetes import FakeCluster

HERE = Path(__file__).resolve().parent
REPORT = [sys.executable, str(HERE / "pods" / "report.py")]
IMAGE = "example.test/report:1"
FANOUT = "workflowtemplates/keybrake-fanout.yaml"


@pytest.fixture
def fake(cluster: FakeCluster) -> Iterator[FakeKeybrake]:
    """The stand-in proxy, taking the projected tokens the cluster signs for it."""
    proxy = FakeKeybrake(accept=cluster.accepts)
    server = serve(proxy)
    yield proxy
    server.shutdown()
    server.server_close()


def simulator(
    catalog: list[dict[str, Any]], tmp_path: Path, cluster: FakeCluster, **options: Any
) -> Simulator:
    return Simulator(
        catalog,
        workdir=tmp_path / "run",
        cluster=cluster,
        entrypoints={IMAGE: REPORT},
        commands={"billing-agent": REPORT},
        **options,
    )


@pytest.fixture
def sim(catalog: list[dict[str, Any]], tmp_path: Path, cluster: FakeCluster) -> Simulator:
    """The simulator over the installed templates, in the test's cluster."""
    return simulator(catalog, tmp_path, cluster)


def fanout_parameters(fake: FakeKeybrake, items: list[Any], **extra: str) -> dict[str, str]:
    return {
        "items": json.dumps(items),
        "image": IMAGE,
        "budget_usd": "25",
        "proxy_url": fake.url,
        **extra,
    }


def reported(pod: Pod) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(pod.stdout)
    return report


def template_env_names(document: dict[str, Any], name: str) -> set[str]:
    body = next(t for t in document["spec"]["templates"] if t["name"] == name)
    return {e["name"] for e in (body.get("script") or body["container"])["env"]}


def test_a_succeeded_fanout_run(
    fake: FakeKeybrake,
    sim: Simulator,
    cluster: FakeCluster,
    documents: dict[str, Any],
) -> None:
    document = documents[FANOUT]
    items = ["a", {"batch": "b"}, "c"]
    run = sim.run(document, fanout_parameters(fake, items))

    assert run.phase == "Succeeded"
    issue, revoke = run.pods_of("keybrake-issue"), run.pods_of("keybrake-revoke")
    assert len(issue) == len(revoke) == 1
    assert fake.requests[0].body["metadata"] == {
        "workflow": "wf-sim",
        "namespace": "argo",
        "uid": "0b6a1f57-2d8e-4e5e-9c55-6c3b0e6b1d01",
        "cluster": "default",
    }
    assert fake.requests[0].body["agent_run_label"] == "argo/wf-sim"
    assert "constraints" not in fake.requests[0].body  # the parameter's default: none
    pods = run.pods_of("run-pod")
    assert len(pods) == 3
    vault_key = fake.keys["vk_1"]["vault_key"]
    # exactly the template's environment, and what the kubelet adds
    kubelet = {"PATH", "HOSTNAME", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}
    expected_names = template_env_names(document, "run-pod") | kubelet
    for pod in pods:
        env = reported(pod)["env"]
        assert set(env) == expected_names
        # the caller tag: the item's identity (kept by Argo's retries), then the pod's name
        item_id = hashlib.sha256(env["KEYBRAKE_ITEM"].encode()).hexdigest()[:12]
        assert env["STRIPE_SECRET_KEY"] == f"{vault_key}.{item_id}@{pod.name}"
        assert env["STRIPE_BASE_URL"] == f"{fake.url}/stripe"
        assert env["KEYBRAKE_BASE_URL"] == f"{fake.url}/stripe"
        assert reported(pod)["argv"] == [env["KEYBRAKE_ITEM"]]
    assert sorted(reported(p)["env"]["KEYBRAKE_ITEM"] for p in pods) == sorted(
        [json.dumps({"batch": "b"}), "a", "c"]
    )
    assert [(r.method, r.path) for r in fake.requests] == [
        ("POST", "/vault/keys"),
        ("DELETE", "/vault/keys/vk_1"),
    ]
    assert fake.keys["vk_1"]["status"] == "revoked"
    assert run.outputs["keybrake_key_id"] == "vk_1"
    assert run.outputs["keybrake_spend_summary"] == (
        "keybrake: key vk_1 revoked: spent $0.00 of $25.00 cap, 0 calls, 0 cap hits "
        "(workflow Succeeded)"
    )
    assert vault_key not in "".join(p.stdout + p.stderr for p in issue + revoke)
    # The key reached the pods from the run's Secret, never through the Workflow object.
    [(namespace, secret_name)] = cluster.secrets
    assert (
        namespace == "argo" and cluster.secret_value("argo", secret_name, "vault_key") == vault_key
    )
    assert vault_key not in json.dumps(run.globals) + json.dumps(document)
    assert vault_key not in json.dumps(_node_parameters(run.entry))


def _node_parameters(node: Any) -> list[Any]:
    """Every output parameter of every node: what Argo stores in the Workflow's status."""
    found = [node.parameters, node.result]
    for child in node.children:
        found += _node_parameters(child)
    return found


def attempts(run: Run, item: str) -> int:
    return sum(1 for pod in run.pods_of("run-pod") if pod.env["KEYBRAKE_ITEM"] == item)


def test_exit_77_is_not_retried_but_other_failures_are(
    fake: FakeKeybrake,
    sim: Simulator,
    documents: dict[str, Any],
) -> None:
    refused, crashed = json.dumps({"exit": 77}), json.dumps({"exit": 1})
    items = [{"exit": 77}, {"exit": 1}]
    run = sim.run(documents[FANOUT], fanout_parameters(fake, items))

    assert run.phase == "Failed"
    assert attempts(run, refused) == 1
    assert attempts(run, crashed) == 4  # the first try and limit: 3 retries
    assert fake.keys["vk_1"]["status"] == "revoked"
    assert run.exit_handler is not None and run.exit_handler.phase == "Succeeded"
    assert run.outputs["keybrake_spend_summary"].endswith("(workflow Failed)")


def test_an_issue_step_refused_by_the_proxy(
    fake: FakeKeybrake,
    sim: Simulator,
    documents: dict[str, Any],
) -> None:
    parameters = fanout_parameters(fake, ["a"], vendor="twilio")  # the stand-in refuses twilio
    run = sim.run(documents[FANOUT], parameters)

    assert run.phase == "Failed"
    [issue] = run.pods_of("keybrake-issue")  # exit 77: not retried
    assert issue.exit_code == 77 and "unknown vendor" in issue.stderr
    assert run.pods_of("run-pod") == []
    [revoke] = run.pods_of("keybrake-revoke")
    assert revoke.env["KEYBRAKE_KEY_ID"] == "{{workflow.outputs.parameters.keybrake_key_id}}"
    assert fake.requests[-1].path == "/vault/keys/revoke"
    summary = run.outputs["keybrake_spend_summary"]
    assert "no id and nothing active labelled argo/wf-sim" in summary


def test_keys_issued_by_a_crashing_issue_step_are_revoked_by_label(
    fake: FakeKeybrake,
    cluster: FakeCluster,
    tmp_path: Path,
    catalog: list[dict[str, Any]],
    documents: dict[str, Any],
) -> None:
    sim = simulator(catalog, tmp_path, cluster, broken_tmp=frozenset({"keybrake-issue"}))
    run = sim.run(documents[FANOUT], fanout_parameters(fake, ["a"]))

    assert run.phase == "Failed"
    assert len(run.pods_of("keybrake-issue")) == 3  # exit 1 is retried: limit 2
    assert len(fake.keys) == 3
    assert all(key["status"] == "revoked" for key in fake.keys.values())
    assert "revoked 3 key(s) labelled argo/wf-sim" in run.outputs["keybrake_spend_summary"]


def test_the_exit_handler_cannot_fail_a_succeeded_run(
    fake: FakeKeybrake,
    sim: Simulator,
    documents: dict[str, Any],
) -> None:
    document = documents[FANOUT]
    fake.script = [(201, {"key_id": "vk_x", "vault_key": "kbv_x"})] + [(503, None)] * 6
    sim.commands["python"] = [sys.executable, str(HERE / "pods" / "no_sleep.py")]
    run = sim.run(document, fanout_parameters(fake, ["a"]))

    assert run.phase == "Succeeded"
    assert "WARNING: could not revoke" in run.outputs["keybrake_spend_summary"]


def test_the_billing_agent_example_runs(
    fake: FakeKeybrake,
    sim: Simulator,
    documents: dict[str, Any],
) -> None:
    document = documents["examples/billing-agent.yaml"]
    for template in document["spec"]["templates"]:
        for parameter in (template.get("inputs") or {}).get("parameters", []):
            if parameter["name"] == "proxy_url":
                parameter["default"] = fake.url
    for task in document["spec"]["templates"][0]["dag"]["tasks"]:
        for argument in task["arguments"]["parameters"]:
            if argument["name"] == "proxy_url":
                argument["value"] = fake.url
    batches = json.dumps(["eu-1", "us-1", "us-2"])
    run = sim.run(document, {"batches": batches})

    assert run.phase == "Succeeded"
    pods = run.pods_of("charge-pod")
    assert sorted(reported(p)["argv"][-1] for p in pods) == ["eu-1", "us-1", "us-2"]
    assert all(reported(p)["argv"] == ["charge", reported(p)["argv"][-1]] for p in pods)
    assert fake.requests[0].body["max_usd_per_call"] == "50"
    assert fake.keys["vk_1"]["status"] == "revoked"


LOCAL_PROXY = "http://keybrake.keybrake.svc.cluster.local:8080"


def pointed_at(document: dict[str, Any], fake: FakeKeybrake) -> dict[str, Any]:
    """`document` with the default proxy URL replaced by the stand-in's."""
    found: dict[str, Any] = json.loads(json.dumps(document).replace(LOCAL_PROXY, fake.url))
    return found


def test_a_workflow_using_the_shared_templates_runs(
    fake: FakeKeybrake, cluster: FakeCluster, tmp_path: Path, catalog: list[dict[str, Any]]
) -> None:
    with Workflow(name="shared", entrypoint="main") as w:
        with DAG(name="main"):
            key = issue_vault_key(
                vendor="stripe",
                daily_usd_cap=10,
                allowed_endpoints=["POST /v1/payment_intents"],
                templates=SharedTemplates(cluster_scope=True),
            )
            fan_out(key, "charge", image=IMAGE, with_items=["x", "y"])
        revoke_on_exit(w, key)
    installed = [pointed_at(t, fake) for t in catalog]
    run = simulator(installed, tmp_path, cluster).run(pointed_at(w.to_dict(), fake))

    assert run.phase == "Succeeded"
    assert len(run.pods_of("issue")) == len(run.pods_of("revoke")) == 1
    assert len(run.pods_of("charge-pod")) == 2
    assert fake.keys["vk_1"]["status"] == "revoked"


def test_a_run_budget_through_the_shared_templates_runs(
    fake: FakeKeybrake, cluster: FakeCluster, tmp_path: Path, catalog: list[dict[str, Any]]
) -> None:
    shared = SharedTemplates()
    with Workflow(name="shared", entrypoint="main") as w:
        with DAG(name="main"):
            budget = issue_budget(total_usd_cap=25, templates=shared)
            for vendor, endpoint in (
                ("stripe", "POST /v1/payment_intents"),
                ("resend", "POST /emails"),
            ):
                key = issue_vault_key(
                    vendor=vendor,
                    budget=budget,
                    allowed_endpoints=[endpoint],
                    name=f"{vendor}-key",
                    templates=shared,
                )
                fan_out(key, f"{vendor}-calls", image=IMAGE, with_items=["x"])
        revoke_on_exit(w, budget)
    installed = [pointed_at(t, fake) for t in catalog]
    run = simulator(installed, tmp_path, cluster).run(pointed_at(w.to_dict(), fake))

    assert run.phase == "Succeeded"
    assert [(r.method, r.path) for r in fake.requests] == [
        ("POST", "/vault/budgets"),
        ("POST", "/vault/keys"),
        ("POST", "/vault/keys"),
        ("DELETE", "/vault/budgets/bg_1"),  # both keys draw on it: one call revokes them all
    ]
    issued = [r.body for r in fake.requests if r.path == "/vault/keys"]
    assert {b["budget_id"] for b in issued} == {"bg_1"}
    assert all("expires_in" not in b and "daily_usd_cap" not in b for b in issued)
    assert fake.budgets["bg_1"]["status"] == "revoked"
    assert {k["status"] for k in fake.keys.values()} == {"revoked"}
    assert run.outputs["keybrake_budget_id"] == "bg_1"
    assert run.outputs["keybrake_spend_summary"].startswith(
        "keybrake: budget bg_1 revoked with its 2 key(s): spent $0.00 of $25.00 cap"
    )


def test_a_fanout_run_passes_its_constraints_parameter_to_the_proxy(
    fake: FakeKeybrake,
    sim: Simulator,
    documents: dict[str, Any],
) -> None:
    constraints = {"customers": ["cus_1"], "currencies": ["usd"], "mode": "enforce"}
    parameters = fanout_parameters(fake, ["a"], constraints=json.dumps(constraints))
    run = sim.run(documents[FANOUT], parameters)

    assert run.phase == "Succeeded"
    assert fake.requests[0].path == "/vault/keys"
    assert fake.requests[0].body["constraints"] == constraints
    [issue] = run.pods_of("keybrake-issue")
    assert "constrained by currencies, customers" in issue.stdout


def constraints_run(templates: SharedTemplates, constraints: bool) -> dict[str, Any]:
    """A run budget and a Stripe key drawing on it, through the installed templates; with
    `constraints`, each has its own."""
    with Workflow(name="constrained", entrypoint="main") as w:
        with DAG(name="main"):
            budget = issue_budget(
                total_usd_cap=25,
                constraints={"recipient_domains": ["example.com"]} if constraints else None,
                templates=templates,
            )
            key = issue_vault_key(
                vendor="stripe",
                budget=budget,
                allowed_endpoints=["POST /v1/payment_intents"],
                constraints={"customers": ["cus_1"], "mode": "report"} if constraints else None,
                templates=templates,
            )
            fan_out(key, "charge", image=IMAGE, with_items=["x"])
        revoke_on_exit(w, budget)
    return w.to_dict()


def test_constraints_reach_the_proxy_through_the_installed_templates(
    fake: FakeKeybrake, cluster: FakeCluster, tmp_path: Path, catalog: list[dict[str, Any]]
) -> None:
    installed = [pointed_at(t, fake) for t in catalog]
    document = pointed_at(constraints_run(SharedTemplates(cluster_scope=True), True), fake)
    run = simulator(installed, tmp_path, cluster).run(document)

    assert run.phase == "Succeeded"
    sent = {r.path: r.body for r in fake.requests if r.method == "POST"}
    assert sent["/vault/budgets"]["constraints"] == {"recipient_domains": ["example.com"]}
    assert sent["/vault/keys"]["constraints"] == {"customers": ["cus_1"], "mode": "report"}


def installed_before_constraints(document: dict[str, Any]) -> dict[str, Any]:
    """`document` as a release before the `constraints` input installed it."""
    for template in document["spec"]["templates"]:
        inputs = template.get("inputs", {}).get("parameters", [])
        template.setdefault("inputs", {})["parameters"] = [
            p for p in inputs if p["name"] != "constraints"
        ]
        if "script" in template:
            env = template["script"]["env"]
            template["script"]["env"] = [e for e in env if e["name"] != "KEYBRAKE_CONSTRAINTS"]
    return document


def test_a_run_without_constraints_still_runs_on_templates_installed_before_them(
    fake: FakeKeybrake, cluster: FakeCluster, tmp_path: Path, catalog: list[dict[str, Any]]
) -> None:
    """The building blocks pass `constraints` only when given: a workflow not using them
    resolves and runs against a keybrake-vault-key installed before the input existed."""
    older = [installed_before_constraints(pointed_at(t, fake)) for t in catalog]
    document = pointed_at(constraints_run(SharedTemplates(cluster_scope=True), False), fake)
    assert problems(document, Catalog(older)) == []
    run = simulator(older, tmp_path, cluster).run(document)

    assert run.phase == "Succeeded"
    assert [(r.method, r.path) for r in fake.requests][:2] == [
        ("POST", "/vault/budgets"),
        ("POST", "/vault/keys"),
    ]
    assert not any("constraints" in (r.body or {}) for r in fake.requests)
    # A run with constraints needs this release's templates: Argo would drop the argument an
    # older one does not declare (and issue without them); the offline checks refuse it.
    constrained = pointed_at(constraints_run(SharedTemplates(cluster_scope=True), True), fake)
    assert [p for p in problems(constrained, Catalog(older)) if "constraints" in p] == [
        f"templates.main.tasks.{task}: passes 'constraints', which the template does not take"
        for task in ("issue-budget", "issue-vault-key")
    ]


def before_wrap(vendors: list[str]) -> str:
    """A workflow whose one step per vendor reads that vendor's key from a Secret."""
    variables = {"stripe": "STRIPE_SECRET_KEY", "resend": "RESEND_API_KEY"}
    tasks = "".join(f"      - {{name: {v}, template: {v}}}\n" for v in vendors)
    templates = "".join(
        f"  - name: {v}\n"
        f"    container:\n"
        f"      image: {IMAGE}\n"
        f"      env:\n"
        f"      - name: {variables[v]}\n"
        f"        valueFrom: {{secretKeyRef: {{name: {v}, key: api_key}}}}\n"
        for v in vendors
    )
    return (
        "apiVersion: argoproj.io/v1alpha1\nkind: Workflow\nmetadata:\n  name: orders\n"
        "spec:\n  entrypoint: main\n  templates:\n  - name: main\n    dag:\n      tasks:\n"
        f"{tasks}{templates}"
    )


@pytest.mark.parametrize(
    ("vendors", "holder"),
    [(["stripe"], "/vault/keys"), (["stripe", "resend"], "/vault/budgets")],
    ids=["its-key", "its-budget"],
)
def test_wrap_constraints_reach_the_proxy_on_what_holds_the_runs_cap(
    fake: FakeKeybrake,
    sim: Simulator,
    vendors: list[str],
    holder: str,
) -> None:
    """`keybrake wrap --constraint`: the wrapped run's one key, or (several vendors) its budget,
    is issued with the constraints, through the installed keybrake-vault-key."""
    constraints = {"customers": ["cus_1"], "mode": "report"}
    if "resend" in vendors:
        constraints["recipient_domains"] = ["example.com"]
    options = WrapOptions(budget_usd=Decimal("30"), proxy_url=fake.url, constraints=constraints)
    wrapped = wrap_text(before_wrap(vendors), options)
    assert wrapped.vendors == sorted(vendors)
    run = sim.run(YAML(typ="safe").load(wrapped.text))

    assert run.phase == "Succeeded"
    posted = [(r.path, r.body) for r in fake.requests if r.method == "POST"]
    assert sorted(path for path, _ in posted) == sorted(
        ["/vault/keys"] * len(vendors) + (["/vault/budgets"] if len(vendors) > 1 else [])
    )
    for path, body in posted:
        assert body.get("constraints") == (constraints if path == holder else None), path


def test_dependent_variables_expand_as_kubernetes_does() -> None:
    from argocheck.simulator import _expand

    defined = {"RAW": "kbv_x", "EMPTY": ""}
    assert _expand("$(RAW).item@pod", defined) == "kbv_x.item@pod"
    assert _expand("$(MISSING) stays", defined) == "$(MISSING) stays"  # unknown: as written
    assert _expand("$$(RAW) is escaped", defined) == "$(RAW) is escaped"
    assert _expand("a$(EMPTY)b", defined) == "ab"


def test_the_fanout_runs_its_steps_in_the_given_image_account_and_cluster(
    fake: FakeKeybrake,
    sim: Simulator,
    cluster: FakeCluster,
    documents: dict[str, Any],
) -> None:
    """`argo submit --from workflowtemplate/keybrake-fanout -p step_image=... -p cluster=...
    -p issuer_service_account=...`: no generated YAML edited."""
    mirror = "registry.corp.example/mirror/python:3.12-alpine"
    cluster.allow("argo", "payments-keybrake", "create")  # its own Role, as templates/rbac/'s
    parameters = fanout_parameters(
        fake,
        ["a"],
        step_image=mirror,
        cluster="eu-1",
        issuer_service_account="payments-keybrake",
    )
    run = sim.run(documents[FANOUT], parameters)

    assert run.phase == "Succeeded"
    steps = run.pods_of("keybrake-issue") + run.pods_of("keybrake-revoke")
    assert [(p.image, p.service_account) for p in steps] == [(mirror, "payments-keybrake")] * 2
    [pod] = run.pods_of("run-pod")
    assert (pod.image, pod.service_account) == (IMAGE, "keybrake-workload")
    assert fake.requests[0].body["metadata"]["cluster"] == "eu-1"
    creators = {r.user for r in cluster.requests if r.method == "POST"}
    assert creators == {"system:serviceaccount:argo:payments-keybrake"}
