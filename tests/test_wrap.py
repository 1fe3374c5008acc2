"""`keybrake wrap`: what it rewrites and what it keeps, what it refuses (exit 2, naming the
template and why), and the command's options. Running the output:
tests/e2e/hera/test_wrap_runs_processes.py."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from keybrake.adopt.wrap import CODE_CHANGES, WrapError, WrapOptions, wrap_text
from keybrake.cli.main import app

WORKFLOWS = Path(__file__).resolve().parent / "adopt" / "workflows"
OPTIONS = WrapOptions(budget_usd=Decimal("300"))
WRAPPABLE = (
    "before-billing-agent.yaml",
    "steps-bounded-onerror.yaml",
    "single-pod-default-retry.yaml",
    "nested-fanout.yaml",
)


def load(text: str) -> dict[str, Any]:
    document: dict[str, Any] = YAML(typ="safe").load(io.StringIO(text))
    return document


def templates(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in document["spec"]["templates"]}


@pytest.mark.parametrize("name", WRAPPABLE)
def test_wrapping_twice_changes_nothing_more(name: str) -> None:
    once = wrap_text((WORKFLOWS / name).read_text(), OPTIONS)
    assert once.changed
    twice = wrap_text(once.text, OPTIONS)
    assert not twice.changed and twice.text == once.text


@pytest.mark.parametrize("name", WRAPPABLE)
def test_everything_else_is_kept(name: str) -> None:
    """Comments, key order and every line outside the rewritten parts come out as they were:
    the diff removes only the lines it must (the Secret reference, the retry policy, the
    entrypoint)."""
    original = (WORKFLOWS / name).read_text()
    wrapped = wrap_text(original, OPTIONS)
    removed = [
        line[1:].strip()
        for line in wrapped.diff(original, name).splitlines()
        if line.startswith("-") and not line.startswith("---")
    ]
    # At most: the entrypoint, the retry policy, and one env entry's four lines per credential.
    assert len(removed) <= 2 + 4 * original.count("secretKeyRef"), removed
    structural = ("entrypoint:", "retryPolicy:", "valueFrom:", "secretKeyRef:", "key: ")
    secret_names = ("STRIPE", "TWILIO", "stripe", "twilio", "payments")
    assert all(
        line.startswith(structural) or any(s in line for s in secret_names) for line in removed
    ), removed
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert all(comment in wrapped.text for comment in comments)


def test_the_before_shape_becomes_the_vault_key_pattern() -> None:
    wrapped = wrap_text(
        (WORKFLOWS / "before-billing-agent.yaml").read_text(),
        WrapOptions(budget_usd=Decimal("300"), max_usd_per_pod=Decimal("20")),
    )
    document = load(wrapped.text)
    spec, found = document["spec"], templates(document)
    assert spec["entrypoint"] == "keybrake-main" and spec["onExit"] == "keybrake-exit"
    main = {t["name"]: t for t in found["keybrake-main"]["dag"]["tasks"]}
    assert main["run"] == {"name": "run", "template": "main", "depends": "keybrake-stripe"}
    issue = found["keybrake-stripe-key"]["dag"]["tasks"][0]
    assert issue["templateRef"] == {
        "name": "keybrake-vault-key",
        "template": "issue",
        "clusterScope": True,
    }
    arguments = {p["name"]: p["value"] for p in issue["arguments"]["parameters"]}
    assert arguments["total_usd_cap"] == "300" and arguments["max_usd_per_caller"] == "20"
    assert arguments["request_id"] == "{{workflow.uid}}/keybrake-stripe"  # retries: one key
    env = {e["name"]: e for e in found["charge-batch"]["container"]["env"]}
    assert list(env) == ["KEYBRAKE_VAULT_KEY_STRIPE_RAW", "STRIPE_SECRET_KEY", "STRIPE_BASE_URL"]
    assert env["KEYBRAKE_VAULT_KEY_STRIPE_RAW"]["valueFrom"]["secretKeyRef"] == {
        "name": "{{workflow.outputs.parameters.keybrake_stripe_vault_key_secret}}",
        "key": "vault_key",
    }
    assert env["STRIPE_SECRET_KEY"]["value"] == (
        "$(KEYBRAKE_VAULT_KEY_STRIPE_RAW)."
        "{{=sprig.trunc(12, sprig.sha256sum(inputs.parameters.customer_ids))}}@{{pod.name}}"
    )
    assert "stripe-credentials" not in wrapped.text
    assert found["charge-batch"]["retryStrategy"] == {"limit": "3", "retryPolicy": "OnError"}
    (revoke,) = found["keybrake-exit"]["dag"]["tasks"]
    assert revoke["templateRef"]["template"] == "revoke"
    assert any("parallelism" in note for note in wrapped.notes)
    assert f"stripe pods: code change {CODE_CHANGES['stripe']}" in wrapped.notes


def test_an_existing_exit_handler_runs_first_and_the_revoke_whatever_its_outcome() -> None:
    text = (
        (WORKFLOWS / "before-billing-agent.yaml")
        .read_text()
        .replace("  entrypoint: main\n", "  entrypoint: main\n  onExit: page-on-call\n")
    )
    found = templates(load(wrap_text(text, OPTIONS).text))
    first, revoke = found["keybrake-exit"]["dag"]["tasks"]
    assert first == {"name": "workflow-exit-handler", "template": "page-on-call"}
    assert revoke["depends"] == (
        "workflow-exit-handler.Succeeded || workflow-exit-handler.Failed || "
        "workflow-exit-handler.Errored"
    )


def test_refusals_skip_retries_when_the_pod_says_so() -> None:
    wrapped = wrap_text(
        (WORKFLOWS / "before-billing-agent.yaml").read_text(),
        WrapOptions(budget_usd=Decimal("300"), refusal_exit_code=77),
    )
    assert templates(load(wrapped.text))["charge-batch"]["retryStrategy"] == {
        "limit": "3",
        "retryPolicy": "Always",
        "expression": "asInt(lastRetry.exitCode) != 77",
    }


def test_several_vendors_share_one_budget() -> None:
    text = """\
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata:
  name: order-agent
spec:
  entrypoint: main
  templates:
  - name: main
    steps:
    - - name: charge
        template: charge
    - - name: sms
        template: sms
  - name: charge
    container:
      image: registry.example.com/charge:1
      env:
      - name: STRIPE_SECRET_KEY
        valueFrom: {secretKeyRef: {name: stripe, key: sk}}
  - name: sms
    container:
      image: registry.example.com/sms:1
      env:
      - name: TWILIO_ACCOUNT_SID
        valueFrom: {secretKeyRef: {name: twilio, key: sid}}
      - name: TWILIO_AUTH_TOKEN
        valueFrom: {secretKeyRef: {name: twilio, key: token}}
"""
    wrapped = wrap_text(text, OPTIONS)
    assert wrapped.vendors == ["stripe", "twilio"]
    found = templates(load(wrapped.text))
    main = {t["name"]: t for t in found["keybrake-main"]["dag"]["tasks"]}
    budget = {p["name"]: p["value"] for p in main["keybrake-budget"]["arguments"]["parameters"]}
    assert budget["total_usd_cap"] == "300"
    assert main["keybrake-twilio"]["depends"] == "keybrake-budget"
    assert main["run"]["depends"] == "keybrake-stripe && keybrake-twilio"
    issue = found["keybrake-twilio-key"]["dag"]["tasks"][0]
    arguments = {p["name"]: p["value"] for p in issue["arguments"]["parameters"]}
    assert arguments["budget_id"] == "{{inputs.parameters.budget_id}}"
    assert "total_usd_cap" not in arguments
    env = {e["name"]: e for e in found["sms"]["container"]["env"]}
    # The account SID is no credential: left as it was (the proxy rewrites any SID in the path).
    assert env["TWILIO_ACCOUNT_SID"]["valueFrom"]["secretKeyRef"] == {
        "name": "twilio",
        "key": "sid",
    }
    assert env["TWILIO_AUTH_TOKEN"]["value"].startswith("$(KEYBRAKE_VAULT_KEY_TWILIO_RAW).")
    revokes = found["keybrake-exit"]["dag"]["tasks"]
    budget_ids = [
        p for t in revokes for p in t["arguments"]["parameters"] if p["name"] == "budget_id"
    ]
    assert len(budget_ids) == 1  # the budget is revoked once, with every key drawing on it


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("cron-envfrom.yaml", "template send: Secret 'resend-api' (envFrom"),
        ("init-and-sidecar.yaml", "template summarise: Secret 'ai-keys' key 'openai'"),
        ("defaults-volumes-patch.yaml", "comes in by templateDefaults env"),
        ("payments-lib.yaml", "has no entrypoint"),
    ],
)
def test_what_cannot_be_converted_safely_is_refused(name: str, why: str) -> None:
    with pytest.raises(WrapError, match=why.replace("(", r"\(")):
        wrap_text((WORKFLOWS / name).read_text(), OPTIONS)


def test_a_credential_of_no_known_vendor_needs_vendor() -> None:
    text = (WORKFLOWS / "single-pod-default-retry.yaml").read_text()
    text = text.replace("STRIPE_API_KEY", "PAYMENTS_API_KEY").replace("key: stripe", "key: api")
    text = text.replace("name: payments", "name: billing")
    with pytest.raises(WrapError, match=r"cannot tell.*--vendor"):
        wrap_text(text, OPTIONS)
    wrapped = wrap_text(text, WrapOptions(budget_usd=Decimal("300"), vendor="stripe"))
    assert wrapped.vendors == ["stripe"]
    with pytest.raises(WrapError, match="is a stripe credential, not resend"):
        wrap_text(
            (WORKFLOWS / "single-pod-default-retry.yaml").read_text(),
            WrapOptions(budget_usd=Decimal("300"), vendor="resend"),
        )


def test_nothing_to_do_is_said_and_changes_nothing() -> None:
    for name in ("converted.yaml", "not-argo.yaml", "issues-without-revoke.yaml"):
        text = (WORKFLOWS / name).read_text()
        wrapped = wrap_text(text, OPTIONS)
        assert not wrapped.changed and wrapped.text == text
    library = wrap_text((WORKFLOWS / "library-call.yaml").read_text(), OPTIONS)
    assert not library.changed
    assert any("lives in another file" in note for note in library.notes)


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["wrap", *args])


def test_the_command(tmp_path: Path) -> None:
    source = tmp_path / "billing.yaml"
    original = (WORKFLOWS / "before-billing-agent.yaml").read_text()
    source.write_text(original)
    shown = run(str(source), "--budget-usd", "300", "--diff")
    assert shown.exit_code == 0
    assert shown.stdout.startswith(f"--- a/{source}")
    assert "+  entrypoint: keybrake-main" in shown.stdout
    assert "stripe.api_base" in shown.stderr
    assert source.read_text() == original  # --diff writes nothing
    out = tmp_path / "wrapped.yaml"
    assert run(str(source), "--budget-usd", "300", "-o", str(out)).exit_code == 0
    assert "keybrake-main" in out.read_text()
    assert run(str(source), "--budget-usd", "300", "--in-place").exit_code == 0
    assert source.read_text() == out.read_text()
    again = run(str(source), "--budget-usd", "300", "--in-place")
    assert again.exit_code == 0 and "nothing to change" in again.stderr
    for bad, message in (
        (["--budget-usd", "lots"], "--budget-usd 'lots': not a dollar amount"),
        (["--budget-usd", "-5"], "must be a positive dollar amount"),
        (["--budget-usd", "5", "--allow", "FETCH /v1/x"], "unknown method"),
        (["--budget-usd", "5", "-o", str(out), "--in-place"], "choose one"),
    ):
        result = run(str(source), *bad)
        assert result.exit_code == 2 and message in result.output, (bad, result.output)
    refused = run(str(WORKFLOWS / "cron-envfrom.yaml"), "--budget-usd", "5")
    assert refused.exit_code == 2 and "template send" in refused.output
    broken = run(str(Path(__file__).parent / "adopt" / "broken.yaml"), "--budget-usd", "5")
    assert broken.exit_code == 2 and "not valid YAML" in broken.output
    missing = run(str(tmp_path / "none.yaml"), "--budget-usd", "5")
    assert missing.exit_code == 2 and "cannot read" in missing.output
    assert all("Traceback" not in r.output for r in (refused, broken, missing))


def test_argo_examples_have_nothing_to_wrap() -> None:
    examples = Path(__file__).resolve().parent / "argo" / "examples"
    for path in sorted(examples.glob("*.yaml")):
        text = path.read_text()
        wrapped = wrap_text(text, OPTIONS)
        assert not wrapped.changed and wrapped.text == text, path.name
