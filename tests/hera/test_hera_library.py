"""The building blocks: what they add to a workflow, the retry convention, the pod environment,
the templateRef mode, and clear errors for values Argo or keybrake would reject."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from argocheck import schema
from argocheck.semantics import Catalog, problems
from hera.workflows import (
    DAG,
    Parameter,
    RetryStrategy,
    Script,
    Task,
    Workflow,
    WorkflowTemplate,
)

import keybrake.hera_workflows as kh
from keybrake.hera_workflows import (
    EXIT_REFUSED,
    ITEM,
    RETRY_EXPRESSION,
    ProxyConnection,
    SharedTemplates,
    TemplateConfigError,
    default_retry_strategy,
    fan_out,
    issue_budget,
    issue_vault_key,
    revoke_on_exit,
)
from keybrake.hera_workflows.step_pod import step_source

PACKAGE = Path(kh.__file__).parent
STRIPE = ["POST /v1/payment_intents"]


def build(**fan_out_options: Any) -> dict[str, Any]:
    options = {"image": "ghcr.io/acme/agent:1", "with_items": ["a", "b"], **fan_out_options}
    with Workflow(generate_name="t-", entrypoint="main") as w:
        with DAG(name="main"):
            key = issue_vault_key(vendor="stripe", daily_usd_cap=10, allowed_endpoints=STRIPE)
            fan_out(key, "charge", **options)
        revoke_on_exit(w, key)
    document: dict[str, Any] = w.to_dict()
    return document


def template(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in document["spec"]["templates"] if t["name"] == name)


def env_of(document: dict[str, Any], name: str) -> dict[str, Any]:
    body = template(document, name)
    container = body.get("script") or body["container"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_public_names_are_pinned() -> None:
    assert sorted(kh.__all__) == [
        "BUDGET_ID_GLOBAL", "DEFAULT_PROXY_URL", "EXIT_REFUSED", "ITEM", "KEY_ID_GLOBAL",
        "ProxyConnection", "RETRY_EXPRESSION", "RunBudget", "SPEND_SUMMARY_GLOBAL",
        "SharedTemplates", "TemplateConfigError", "VENDORS", "VaultKey", "budget_template",
        "default_retry_strategy", "fan_out", "issue_budget", "issue_template",
        "issue_vault_key", "revoke_on_exit", "revoke_template",
    ]  # fmt: skip


def test_a_minimal_workflow_is_valid_and_complete(catalog: list[dict[str, Any]]) -> None:
    document = build()
    assert schema.all_errors(document) == []
    assert problems(document, Catalog(catalog)) == []
    assert document["spec"]["onExit"] == "keybrake-revoke"
    names = [t["name"] for t in document["spec"]["templates"]]
    assert names == ["main", "keybrake-issue", "charge-pod", "charge", "keybrake-revoke"]
    tasks = template(document, "main")["dag"]["tasks"]
    assert [(t["name"], t.get("depends")) for t in tasks] == [
        ("issue-vault-key", None),
        ("charge", "issue-vault-key"),
    ]
    loop = template(document, "charge")["dag"]["tasks"][0]
    assert loop["withItems"] == ["a", "b"]


def test_the_issue_step_labels_the_key_and_exports_its_id() -> None:
    document = build()
    issue = template(document, "keybrake-issue")
    env = env_of(document, "keybrake-issue")
    assert env["KEYBRAKE_LABEL"] == "argo/{{workflow.name}}"
    assert env["KEYBRAKE_WORKFLOW_NAMESPACE"] == "{{workflow.namespace}}"
    assert env["KEYBRAKE_WORKFLOW_UID"] == "{{workflow.uid}}"
    # No keybrake secret: a projected token for the keybrake audience, as the issuer's account.
    assert "KEYBRAKE_API_KEY" not in env
    assert env["KEYBRAKE_TOKEN_FILE"] == "/var/run/secrets/keybrake/token"
    defaults = {p["name"]: p.get("default") for p in issue["inputs"]["parameters"]}
    assert issue["serviceAccountName"] == "{{inputs.parameters.service_account}}"
    assert defaults["service_account"] == "keybrake-issuer"
    [volume] = issue["volumes"]
    assert volume["projected"]["sources"] == [
        {"serviceAccountToken": {"audience": "keybrake", "expirationSeconds": 600, "path": "token"}}
    ]
    assert issue["script"]["volumeMounts"] == [
        {"name": volume["name"], "mountPath": "/var/run/secrets/keybrake", "readOnly": True}
    ]
    inputs = {p["name"] for p in issue["inputs"]["parameters"]}
    assert "admin" not in " ".join(inputs) and "token" not in " ".join(inputs)
    outputs = {p["name"]: p for p in issue["outputs"]["parameters"]}
    assert outputs["key_id"]["globalName"] == "keybrake_key_id"
    assert set(outputs) == {"key_id", "vault_key", "vault_key_secret"}
    assert outputs["vault_key"]["valueFrom"]["default"] == ""  # never written with a Secret
    assert issue["script"]["image"] == "{{inputs.parameters.step_image}}"
    assert defaults["step_image"] == "python:3.12-alpine" and defaults["cluster"] == "default"
    assert env["KEYBRAKE_CLUSTER"] == "{{inputs.parameters.cluster}}"
    arguments = template(document, "main")["dag"]["tasks"][0]["arguments"]["parameters"]
    assert {p["name"]: p["value"] for p in arguments} == {
        "vendor": "stripe",
        "daily_usd_cap": "10",
        "allowed_endpoints": json.dumps(STRIPE),
        "expires_in": "2h",
        "delivery": "secret",
        "request_id": "{{workflow.uid}}/issue-vault-key",
        "proxy_url": "http://keybrake.keybrake.svc.cluster.local:8080",
    }


# The caller tag: the item's identity (the same for every retry of the item, so a per-pod cap
# holds across Argo's retries), then the pod that made the call (for the audit row).
# The key comes from the run's Secret into the first variable; Kubernetes expands $(...) into
# the tagged key in the ones after it.
TAGGED = (
    "$(KEYBRAKE_VAULT_KEY_RAW)."
    "{{=sprig.trunc(12, sprig.sha256sum(inputs.parameters.item))}}@{{pod.name}}"
)
FROM_SECRET = {
    "secretKeyRef": {"name": "{{inputs.parameters.vault_key_secret}}", "key": "vault_key"}
}


def test_each_pod_gets_its_sdk_environment_with_a_pod_tagged_key() -> None:
    document = build(env={"BATCH_SIZE": "50"})
    env = env_of(document, "charge-pod")
    names = [e["name"] for e in template(document, "charge-pod")["container"]["env"]]
    assert names[0] == "KEYBRAKE_VAULT_KEY_RAW" and env[names[0]] == FROM_SECRET
    tagged = TAGGED
    assert env["STRIPE_SECRET_KEY"] == tagged
    assert env["STRIPE_BASE_URL"] == "{{inputs.parameters.proxy_url}}/stripe"
    assert env["KEYBRAKE_VAULT_KEY"] == tagged
    assert env["KEYBRAKE_ITEM"] == ITEM
    assert env["BATCH_SIZE"] == "50"
    assert "RESEND_API_KEY" not in env  # only the key's vendor


def test_resend_needs_only_its_two_variables() -> None:
    with Workflow(generate_name="t-", entrypoint="main") as w:
        with DAG(name="main"):
            key = issue_vault_key(
                vendor="resend", daily_usd_cap=5, allowed_endpoints=["POST /emails"]
            )
            fan_out(key, "mail", image="ghcr.io/acme/mailer:1", with_items=["x"])
    env = env_of(w.to_dict(), "mail-pod")
    assert env["RESEND_API_KEY"] == TAGGED
    assert env["RESEND_API_URL"] == "{{inputs.parameters.proxy_url}}/resend"


def test_twilio_pods_get_a_placeholder_account_sid() -> None:
    with Workflow(generate_name="t-", entrypoint="main") as w:
        with DAG(name="main"):
            key = issue_vault_key(
                vendor="twilio",
                daily_usd_cap=5,
                allowed_endpoints=["POST /2010-04-01/Accounts/*/Messages.json"],
            )
            fan_out(key, "sms", image="ghcr.io/acme/notifier:1", with_items=["x"])
    env = env_of(w.to_dict(), "sms-pod")
    assert env["TWILIO_ACCOUNT_SID"] == "AC" + "0" * 32
    assert env["TWILIO_AUTH_TOKEN"] == TAGGED
    assert env["TWILIO_BASE_URL"] == "{{inputs.parameters.proxy_url}}/twilio"


def test_pods_retry_transient_failures_but_never_exit_77() -> None:
    retry = template(build(), "charge-pod")["retryStrategy"]
    assert EXIT_REFUSED == 77
    assert retry["retryPolicy"] == "Always"  # OnError would never retry a non-zero exit
    assert retry["expression"] == "asInt(lastRetry.exitCode) != 77"
    assert retry["limit"] == 3
    revoke = template(build(), "keybrake-revoke")["retryStrategy"]
    assert revoke["retryPolicy"] == "OnError"  # the step itself always exits 0


def test_a_custom_retry_strategy_is_accepted() -> None:
    hera_retry = RetryStrategy(limit=1, retry_policy="Always", expression=RETRY_EXPRESSION)
    retry = template(build(retry=hera_retry), "charge-pod")["retryStrategy"]
    assert retry == {"limit": 1, "retryPolicy": "Always", "expression": RETRY_EXPRESSION}
    assert (
        template(build(retry=default_retry_strategy(0)), "charge-pod")["retryStrategy"]["limit"]
        == 0
    )
    with pytest.raises(TemplateConfigError, match="retry limit"):
        default_retry_strategy(-1)


def test_with_param_from_a_previous_task_adds_the_dependency(catalog: list[dict]) -> None:
    plan = Script(name="plan", image="python:3.12-alpine", command=["python"], source="print(1)")
    with Workflow(generate_name="t-", entrypoint="main") as w:
        with DAG(name="main"):
            planned = Task(name="plan", template=plan)
            key = issue_vault_key(vendor="stripe", daily_usd_cap=10, allowed_endpoints=STRIPE)
            fan_out(key, "charge", image="a:1", with_param=planned, parallelism=3)
        revoke_on_exit(w, key)
    document = w.to_dict()
    assert schema.all_errors(document) == []
    assert problems(document, Catalog(catalog)) == []
    task = template(document, "main")["dag"]["tasks"][-1]
    assert task["depends"] == "issue-vault-key && plan"
    assert {"name": "items", "value": "{{tasks.plan.outputs.result}}"} in task["arguments"][
        "parameters"
    ]
    assert template(document, "charge")["parallelism"] == 3


def test_with_param_from_a_workflow_parameter() -> None:
    document = build(with_items=None, with_param="{{workflow.parameters.items}}", args=["-x", ITEM])
    loop = template(document, "charge")["dag"]["tasks"][0]
    assert loop["withParam"] == "{{inputs.parameters.items}}"
    assert template(document, "charge-pod")["container"]["args"] == ["-x", ITEM]


def test_shared_templates_are_referenced_not_copied(catalog: list[dict[str, Any]]) -> None:
    for cluster_scope in (False, True):
        shared = SharedTemplates(cluster_scope=cluster_scope)
        with Workflow(generate_name="t-", entrypoint="main") as w:
            with DAG(name="main"):
                key = issue_vault_key(
                    vendor="stripe", daily_usd_cap=10, allowed_endpoints=STRIPE, templates=shared
                )
                fan_out(key, "charge", image="a:1", with_items=["a"])
            revoke_on_exit(w, key)
        document = w.to_dict()
        assert schema.all_errors(document) == []
        assert problems(document, Catalog(catalog)) == []
        names = {t["name"] for t in document["spec"]["templates"]}
        assert names == {"main", "charge", "charge-pod", "keybrake-revoke"}
        issue = template(document, "main")["dag"]["tasks"][0]
        assert issue["templateRef"]["name"] == "keybrake-vault-key"
        assert issue["templateRef"].get("clusterScope", False) is cluster_scope
        exit_task = template(document, "keybrake-revoke")["dag"]["tasks"][0]
        assert exit_task["templateRef"]["template"] == "revoke"
        only_namespaced = [d for d in catalog if d["kind"] != "ClusterWorkflowTemplate"]
        assert bool(problems(document, Catalog(only_namespaced))) is cluster_scope


MIRROR = "registry.corp.example/mirror/python:3.12-alpine"


def test_a_custom_step_image_account_and_cluster_land_where_they_must(
    catalog: list[dict[str, Any]],
) -> None:
    """Air-gapped and locked-down clusters set the keybrake steps' image, service account and
    cluster name as arguments, never by editing generated YAML."""
    proxy = ProxyConnection(step_image=MIRROR, service_account="payments-keybrake", cluster="eu-1")

    def run(templates: SharedTemplates | None) -> dict[str, Any]:
        with Workflow(generate_name="t-", entrypoint="main") as w:
            with DAG(name="main"):
                budget = issue_budget(total_usd_cap=50, proxy=proxy, templates=templates)
                key = issue_vault_key(
                    vendor="stripe",
                    budget=budget,
                    allowed_endpoints=STRIPE,
                    proxy=proxy,
                    templates=templates,
                )
                fan_out(key, "charge", image="a:1", with_items=["a"], service_account="agents")
            revoke_on_exit(w, budget)
        document: dict[str, Any] = w.to_dict()
        assert schema.all_errors(document) == []
        return document

    inline = run(None)
    for name in ("keybrake-issue", "keybrake-budget", "keybrake-revoke"):
        step = template(inline, name)
        defaults = {p["name"]: p.get("default") for p in step["inputs"]["parameters"]}
        assert step["script"]["image"] == "{{inputs.parameters.step_image}}"
        assert defaults["step_image"] == MIRROR, name
        assert step["serviceAccountName"] == "{{inputs.parameters.service_account}}"
        assert defaults["service_account"] == "payments-keybrake", name
        if name != "keybrake-revoke":
            assert defaults["cluster"] == "eu-1"
    assert template(inline, "charge-pod")["serviceAccountName"] == "agents"

    shared = run(SharedTemplates())
    assert problems(shared, Catalog(catalog)) == []
    tasks = {t["name"]: t for t in template(shared, "main")["dag"]["tasks"]}
    [exit_task] = template(shared, "keybrake-revoke")["dag"]["tasks"]
    for task, cluster in (
        (tasks["issue-budget"], True),
        (tasks["issue-vault-key"], True),
        (exit_task, False),
    ):
        given = {p["name"]: p["value"] for p in task["arguments"]["parameters"]}
        assert given["step_image"] == MIRROR and given["service_account"] == "payments-keybrake"
        assert given.get("cluster") == ("eu-1" if cluster else None)

    # The defaults pass nothing new, so workflows keep running against older installed templates.
    defaults = build()
    issue = template(defaults, "main")["dag"]["tasks"][0]
    assert not {"step_image", "service_account", "cluster"} & {
        p["name"] for p in issue["arguments"]["parameters"]
    }
    with pytest.raises(TemplateConfigError, match="step_image"):
        ProxyConnection(step_image="python 3.12")
    with pytest.raises(TemplateConfigError, match="cluster"):
        ProxyConnection(cluster="EU 1")
    with pytest.raises(TemplateConfigError, match="named service account"):
        with Workflow(generate_name="t-", entrypoint="main"), DAG(name="main"):
            issue_vault_key(
                vendor="stripe",
                daily_usd_cap=5,
                allowed_endpoints=STRIPE,
                proxy=ProxyConnection(service_account=None),
                templates=SharedTemplates(),
            )


def test_a_key_delivered_as_a_parameter_reaches_the_pods_as_one() -> None:
    with Workflow(generate_name="t-", entrypoint="main") as w:
        with DAG(name="main"):
            key = issue_vault_key(
                vendor="stripe", daily_usd_cap=5, allowed_endpoints=STRIPE, delivery="parameter"
            )
            fan_out(key, "charge", image="a:1", with_items=["x"])
    document = w.to_dict()
    env = env_of(document, "charge-pod")
    assert env["STRIPE_SECRET_KEY"] == TAGGED.replace(
        "$(KEYBRAKE_VAULT_KEY_RAW)", "{{inputs.parameters.vault_key}}"
    )
    assert "KEYBRAKE_VAULT_KEY_RAW" not in env
    with pytest.raises(TemplateConfigError, match="delivered in a Secret"):
        with Workflow(generate_name="t-", entrypoint="main"), DAG(name="main"):
            issue_vault_key(vendor="stripe", daily_usd_cap=5, allowed_endpoints=STRIPE).vault_key
    with pytest.raises(TemplateConfigError, match="delivery must be"):
        with Workflow(generate_name="t-", entrypoint="main"), DAG(name="main"):
            issue_vault_key(
                vendor="stripe", daily_usd_cap=5, allowed_endpoints=STRIPE, delivery="env"
            )


def test_a_custom_proxy_and_secret_reach_both_steps() -> None:
    proxy = ProxyConnection(
        url="https://kb.example:8443",
        auth="token",
        secret_name="kb-admin",
        secret_key="t",
        ca_configmap="kb-ca",
    )
    with Workflow(generate_name="t-", entrypoint="main") as w:
        with DAG(name="main"):
            key = issue_vault_key(
                vendor="stripe", daily_usd_cap="12.50", allowed_endpoints=STRIPE, proxy=proxy
            )
        revoke_on_exit(w, key)
    document = w.to_dict()
    for name in ("keybrake-issue", "keybrake-revoke"):
        env = env_of(document, name)
        assert env["KEYBRAKE_API_KEY"]["secretKeyRef"] == {"name": "kb-admin", "key": "t"}
        assert env["KEYBRAKE_CA_BUNDLE"] == "/etc/keybrake/ca/ca.crt"
        assert "KEYBRAKE_TOKEN_FILE" not in env
        defaults = {
            p["name"]: p.get("default") for p in template(document, name)["inputs"]["parameters"]
        }
        assert defaults["proxy_url"] == "https://kb.example:8443"
    with pytest.raises(TemplateConfigError, match="inline templates"):
        with Workflow(generate_name="t-", entrypoint="main"), DAG(name="main"):
            issue_vault_key(
                vendor="stripe",
                daily_usd_cap=1,
                allowed_endpoints=STRIPE,
                proxy=proxy,
                templates=SharedTemplates(),
            )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"vendor": "paypal"}, "unknown vendor 'paypal'"),
        ({"daily_usd_cap": -5}, "positive dollar amount"),
        ({"daily_usd_cap": 10.5}, "int, Decimal or string"),
        ({"daily_usd_cap": "lots"}, "dollar amount"),
        ({"max_usd_per_call": 0}, "positive dollar amount"),
        ({"allowed_endpoints": ["payment_intents"]}, "'METHOD /path'"),
        ({"allowed_endpoints": []}, "non-empty"),
        ({"allowed_endpoints": "POST /v1/charges"}, "a list such as"),
        ({"expires_in": "2 hours"}, "duration such as"),
        ({"constraints": {"recipients": ["+4420*"]}}, "recipients: not a stripe constraint"),
        ({"constraints": {"customers": ["bob"]}}, "'bob' is not a Stripe customer id"),
        ({"constraints": {}}, "constrain at least one of"),
        ({"constraints": {"customers": ["cus_1"], "mode": "dry"}}, "enforce or report"),
        ({"constraints": '{"customers": ["cus_1"]}'}, "a mapping such as"),
    ],
)
def test_bad_issue_arguments_are_refused_clearly(options: dict[str, Any], message: str) -> None:
    arguments = {"vendor": "stripe", "daily_usd_cap": 10, "allowed_endpoints": STRIPE, **options}
    with pytest.raises(TemplateConfigError, match=message):
        with Workflow(generate_name="t-", entrypoint="main"), DAG(name="main"):
            issue_vault_key(**arguments)


@pytest.mark.parametrize(
    ("budget", "key", "message"),
    [
        ({}, {}, "issue_budget\\(\\) needs total_usd_cap"),
        ({"total_usd_cap": -1}, {}, "positive dollar amount"),
        ({"total_usd_cap": 5, "expires_in": "a day"}, {}, "duration such as"),
        (None, {}, "needs daily_usd_cap .* or total_usd_cap .* or a budget="),
        ({"total_usd_cap": 5}, {"max_usd_per_caller": 0}, "positive dollar amount"),
        ({"total_usd_cap": 5, "constraints": {"payees": ["x"]}}, {}, "unknown field 'payees'"),
    ],
)
def test_bad_budget_arguments_are_refused_clearly(
    budget: dict[str, Any] | None, key: dict[str, Any], message: str
) -> None:
    with pytest.raises(TemplateConfigError, match=message):
        with Workflow(generate_name="t-", entrypoint="main"), DAG(name="main"):
            run_budget = issue_budget(**budget) if budget is not None else None
            issue_vault_key(vendor="stripe", allowed_endpoints=STRIPE, budget=run_budget, **key)


def arguments_of(document: dict[str, Any], task: str) -> dict[str, str]:
    found = next(t for t in template(document, "main")["dag"]["tasks"] if t["name"] == task)
    return {p["name"]: p["value"] for p in found["arguments"]["parameters"]}


def test_constraints_reach_the_issue_and_budget_steps_only_when_given(
    catalog: list[dict[str, Any]],
) -> None:
    """Checked as the proxy checks them when written out (a budget's may name any vendor's
    fields, a key's only its own vendor's), passed as JSON, an expression as it is; without them
    no `constraints` argument at all, so a workflow runs against an older installed template."""
    key_constraints = {"customers": ["cus_1", "cus_2"], "currencies": ["usd"], "mode": "report"}
    submitted = [Parameter(name="vendor", value="twilio"), Parameter(name="constraints", value="")]
    with Workflow(generate_name="t-", entrypoint="main", arguments=submitted) as w:
        with DAG(name="main"):
            budget = issue_budget(
                total_usd_cap=50,
                constraints={"recipients": ["+4420*"], "recipient_domains": ["example.com"]},
                templates=SharedTemplates(),
            )
            issue_vault_key(
                vendor="stripe",
                budget=budget,
                allowed_endpoints=STRIPE,
                constraints=key_constraints,
                templates=SharedTemplates(),
            )
            issue_vault_key(
                vendor="{{workflow.parameters.vendor}}",  # any vendor's fields, checked at issue
                daily_usd_cap=5,
                allowed_endpoints=STRIPE,
                constraints="{{workflow.parameters.constraints}}",
                name="chosen-at-submit",
            )
        revoke_on_exit(w, budget)
    document = w.to_dict()
    assert schema.all_errors(document) == []
    assert problems(document, Catalog(catalog)) == []
    assert json.loads(arguments_of(document, "issue-budget")["constraints"]) == {
        "recipients": ["+4420*"],
        "recipient_domains": ["example.com"],
    }
    assert json.loads(arguments_of(document, "issue-vault-key")["constraints"]) == key_constraints
    assert arguments_of(document, "chosen-at-submit")["constraints"] == (
        "{{workflow.parameters.constraints}}"
    )
    inline = template(document, "keybrake-issue")
    assert {"name": "KEYBRAKE_CONSTRAINTS", "value": "{{inputs.parameters.constraints}}"} in (
        inline["script"]["env"]
    )

    without = budget_run(SharedTemplates())
    for task in ("issue-budget", "stripe-key", "resend-key"):
        assert "constraints" not in arguments_of(without, task), task
    assert "constraints" not in arguments_of(build(), "issue-vault-key")


def budget_run(templates: SharedTemplates | None = None) -> dict[str, Any]:
    with Workflow(generate_name="t-", entrypoint="main") as w:
        with DAG(name="main"):
            budget = issue_budget(total_usd_cap=100, templates=templates)
            stripe = issue_vault_key(
                vendor="stripe",
                budget=budget,
                max_usd_per_caller=10,
                allowed_endpoints=STRIPE,
                name="stripe-key",
                templates=templates,
            )
            resend = issue_vault_key(
                vendor="resend",
                budget=budget,
                allowed_endpoints=["POST /emails"],
                expires_in="1h",
                name="resend-key",
                templates=templates,
            )
            fan_out(stripe, "charge", image="a:1", with_items=["x"])
            fan_out(resend, "mail", image="a:1", with_items=["x"])
        revoke_on_exit(w, budget)
    document: dict[str, Any] = w.to_dict()
    return document


def test_a_run_budget_is_issued_first_drawn_on_by_each_key_and_revoked_on_exit(
    catalog: list[dict[str, Any]],
) -> None:
    document = budget_run()
    assert schema.all_errors(document) == []
    assert problems(document, Catalog(catalog)) == []
    tasks = {t["name"]: t for t in template(document, "main")["dag"]["tasks"]}

    def arguments(task: str) -> dict[str, str]:
        return {p["name"]: p["value"] for p in tasks[task]["arguments"]["parameters"]}

    assert arguments("issue-budget") == {
        "total_usd_cap": "100",
        "expires_in": "6h",
        "request_id": "{{workflow.uid}}/issue-budget",
        "proxy_url": "http://keybrake.keybrake.svc.cluster.local:8080",
    }
    drawn = "{{tasks.issue-budget.outputs.parameters.budget_id}}"
    assert tasks["stripe-key"]["depends"] == tasks["resend-key"]["depends"] == "issue-budget"
    assert arguments("stripe-key")["budget_id"] == arguments("resend-key")["budget_id"] == drawn
    assert arguments("stripe-key")["max_usd_per_caller"] == "10"
    assert "daily_usd_cap" not in arguments("stripe-key")  # the budget bounds it
    assert arguments("stripe-key")["expires_in"] == ""  # as long as the budget lives
    assert arguments("resend-key")["expires_in"] == "1h"
    budget_template = template(document, "keybrake-budget")
    outputs = budget_template["outputs"]["parameters"]
    assert [(o["name"], o["globalName"]) for o in outputs] == [("budget_id", "keybrake_budget_id")]
    assert env_of(document, "keybrake-budget")["KEYBRAKE_ISSUE"] == "budget"
    revoke = {
        p["name"]: p.get("default")
        for p in template(document, "keybrake-revoke")["inputs"]["parameters"]
    }
    assert revoke["budget_id"] == "{{workflow.outputs.parameters.keybrake_budget_id}}"
    # a run without a budget never sets that global: its revoke does not look for one
    plain = {
        p["name"]: p.get("default")
        for p in template(build(), "keybrake-revoke")["inputs"]["parameters"]
    }
    assert plain["budget_id"] == ""


def test_a_run_budget_through_the_shared_templates(catalog: list[dict[str, Any]]) -> None:
    document = budget_run(SharedTemplates())
    assert schema.all_errors(document) == []
    assert problems(document, Catalog(catalog)) == []
    tasks = {t["name"]: t for t in template(document, "main")["dag"]["tasks"]}
    assert tasks["issue-budget"]["templateRef"] == {
        "name": "keybrake-vault-key",
        "template": "budget",
    }
    [handler] = template(document, "keybrake-revoke")["dag"]["tasks"]
    passed = {p["name"]: p["value"] for p in handler["arguments"]["parameters"]}
    assert passed["budget_id"] == "{{workflow.outputs.parameters.keybrake_budget_id}}"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"with_items": None}, "exactly one of"),
        ({"with_param": "{{workflow.parameters.items}}"}, "exactly one of"),
        ({"with_items": []}, "non-empty list"),
        ({"with_items": "ab"}, "non-empty list"),
        ({"with_items": None, "with_param": "items"}, "expression holding a JSON list"),
        ({"parallelism": 0}, "positive integer"),
        ({"image": " "}, "container image"),
        ({"env": {"STRIPE_SECRET_KEY": "sk_live_x"}}, "set by keybrake"),
        ({"env": {"KEYBRAKE_X": "1"}}, "set by keybrake"),
    ],
)
def test_bad_fan_out_arguments_are_refused_clearly(options: dict[str, Any], message: str) -> None:
    with pytest.raises(TemplateConfigError, match=message):
        build(**options)


def test_misuse_of_the_context_is_refused_clearly() -> None:
    with pytest.raises(TemplateConfigError, match=r"inside `with DAG"):
        issue_vault_key(vendor="stripe", daily_usd_cap=1, allowed_endpoints=STRIPE)
    with pytest.raises(TemplateConfigError, match="fan-out name"):
        build_name = "Charge_All"
        with Workflow(generate_name="t-", entrypoint="main"), DAG(name="main"):
            key = issue_vault_key(vendor="stripe", daily_usd_cap=1, allowed_endpoints=STRIPE)
            fan_out(key, build_name, image="a:1", with_items=["x"])
    with pytest.raises(TemplateConfigError, match="already has a different template"):
        with Workflow(generate_name="t-", entrypoint="main"):
            Script(name="charge", image="a:1", command=["python"], source="print(1)")
            with DAG(name="main"):
                key = issue_vault_key(vendor="stripe", daily_usd_cap=1, allowed_endpoints=STRIPE)
                fan_out(key, "charge", image="a:1", with_items=["x"])
    with pytest.raises(TemplateConfigError, match="already has onExit"):
        with Workflow(generate_name="t-", entrypoint="main", on_exit="notify") as w:
            with DAG(name="main"):
                key = issue_vault_key(vendor="stripe", daily_usd_cap=1, allowed_endpoints=STRIPE)
            revoke_on_exit(w, key)
    with pytest.raises(TemplateConfigError, match="already has a task named"):
        with Workflow(generate_name="t-", entrypoint="main"), DAG(name="main"):
            issue_vault_key(vendor="stripe", daily_usd_cap=1, allowed_endpoints=STRIPE)
            issue_vault_key(vendor="stripe", daily_usd_cap=1, allowed_endpoints=STRIPE)


def test_run_time_parameters_are_passed_through(catalog: list[dict[str, Any]]) -> None:
    with WorkflowTemplate(
        name="t",
        entrypoint="main",
        arguments=[Parameter(name=n, value="x") for n in ("vendor", "cap", "eps", "ttl")],
    ) as w:
        with DAG(name="main"):
            key = issue_vault_key(
                vendor="{{workflow.parameters.vendor}}",
                daily_usd_cap="{{workflow.parameters.cap}}",
                allowed_endpoints="{{workflow.parameters.eps}}",
                expires_in="{{workflow.parameters.ttl}}",
            )
            fan_out(key, "run", image="a:1", with_items=["x"])
        revoke_on_exit(w, key)
    document = w.to_dict()
    assert problems(document, Catalog(catalog)) == []
    env = env_of(document, "run-pod")
    assert {"STRIPE_SECRET_KEY", "TWILIO_AUTH_TOKEN", "RESEND_API_KEY"} <= set(env)


# --- the step scripts embedded in the templates ------------------------------------------------


def test_step_sources_are_embedded_unchanged(rendered: list[Any]) -> None:
    by_path = {f.path: f.document for f in rendered}
    library = by_path["workflowtemplates/keybrake-vault-key.yaml"]
    assert template(library, "issue")["script"]["source"] == step_source("issue")
    assert template(library, "revoke")["script"]["source"] == step_source("revoke")


def test_step_sources_use_the_standard_library_only_and_no_argo_tags() -> None:
    for step in ("issue", "revoke"):
        source = step_source(step)
        assert "{{" not in source and "}}" not in source  # Argo would try to substitute them
        imported = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        # python:3.12-alpine has nothing else installed.
        assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_each_step_script_holds_the_shared_code_in_place_of_its_import() -> None:
    common = (PACKAGE / "_step_common.py").read_text(encoding="utf-8")
    common = common.split("from __future__ import annotations\n", 1)[1]
    for step in ("issue", "revoke"):
        source = step_source(step)
        assert source.count(common.strip()) == 1
        assert "_step_common import" not in source


@pytest.mark.parametrize(("step", "code"), [("issue", EXIT_REFUSED), ("revoke", 0)])
def test_each_step_script_runs_alone(step: str, code: int, tmp_path: Path) -> None:
    """Run as the pod runs it (isolated, in an empty folder): nothing of keybrake to import. With
    no inputs the issue step refuses and the revoke step reports, both after the shared code ran."""
    script = tmp_path / "script"
    script.write_text(step_source(step), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-I", str(script)], cwd=tmp_path, env={}, capture_output=True, text=True
    )
    assert done.returncode == code, done.stderr
    assert "keybrake:" in done.stdout + done.stderr
