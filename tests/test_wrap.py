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


# --- what each key may do, said (and its life) ---------------------------------------------------

INVOICING = """\
# Drafts, finalises and pays each customer's invoice: it calls more of Stripe than payment intents.
apiVersion: argoproj.io/v1alpha1
kind: CronWorkflow
metadata:
  name: monthly-invoicing
spec:
  schedule: "0 4 1 * *"
  workflowSpec:
    entrypoint: invoice
    templates:
    - name: invoice
      container:
        image: registry.example.com/invoicing:4
        command: [python, invoice.py]
        env:
        - name: STRIPE_SECRET_KEY
          valueFrom:
            secretKeyRef: {name: stripe-live, key: secret_key}
"""
INVOICE_CALLS = ("GET /v1/customers", "POST /v1/invoices", "POST /v1/invoices/*/pay")


def issue_arguments(text: str, vendor: str) -> dict[str, str]:
    """The arguments `keybrake-<vendor>-key` gives keybrake-vault-key's issue step."""
    document = load(text)
    spec = document["spec"].get("workflowSpec", document["spec"])
    (issue,) = {t["name"]: t for t in spec["templates"]}[f"keybrake-{vendor}-key"]["dag"]["tasks"]
    return {p["name"]: p["value"] for p in issue["arguments"]["parameters"]}


def issued(arguments: dict[str, str]) -> Any:
    """What the issue step, given those arguments, asks the proxy for (as the proxy reads it)."""
    from keybrake.hera_workflows._step_issue import build_request
    from keybrake.proxy.models import KeyCreate

    env = {f"KEYBRAKE_{name.upper()}": value for name, value in arguments.items()}
    if "budget_id" in arguments:
        env["KEYBRAKE_BUDGET_ID"] = "bg_0123456789abcdef"  # what the budget step makes at run time
    return KeyCreate.model_validate(build_request({**env, "KEYBRAKE_LABEL": "argo/run"}))


def longest_key_life() -> str:
    from keybrake.proxy.settings import Settings

    return str(Settings.model_fields["max_ttl"].default)


def test_wrap_says_what_each_key_may_call_spend_and_how_long_it_lives(tmp_path: Path) -> None:
    """An invoicing CronWorkflow got a key for POST /v1/payment_intents only, unsaid: every
    other Stripe call of it was refused (403). wrap now says, per key, what it may call, its
    caps and its life, and warns when the endpoints are its default ones."""
    source, out = tmp_path / "invoicing.yaml", tmp_path / "out.yaml"
    source.write_text(INVOICING)
    result = run(str(source), "--budget-usd", "40", "--max-usd-per-pod", "5", "-o", str(out))
    assert result.exit_code == 0, result.output
    said = result.stderr
    assert (
        "keybrake wrap: CronWorkflow/monthly-invoicing: stripe key: may call "
        "POST /v1/payment_intents; spends at most $40 in the run (--budget-usd), $5 per "
        "fanned-out item (--max-usd-per-pod); lives until the run ends (keybrake-exit revokes "
        f"it, keybrake reaper should that not run); it expires after {longest_key_life()} at most"
    ) in said
    assert (
        "keybrake wrap: warning: CronWorkflow/monthly-invoicing: the stripe key may call "
        "POST /v1/payment_intents only, wrap's default (stripe's usual spending call): the proxy "
        "refuses (403) every other Stripe endpoint the pods call; name each one with --allow"
    ) in said
    allow = [a for call in INVOICE_CALLS for a in ("--allow", call)]
    told = run(str(source), "--budget-usd", "40", *allow, "-o", str(out))
    assert told.exit_code == 0, told.output
    assert f"stripe key: may call {', '.join(INVOICE_CALLS)};" in told.stderr
    assert "warning" not in told.stderr
    assert issued(issue_arguments(out.read_text(), "stripe")).allowed_endpoints == list(
        INVOICE_CALLS
    )


@pytest.mark.parametrize(
    ("deadline", "expires_in", "life"),
    [
        (None, None, longest_key_life()),  # until the run ends: the proxy's longest key life
        ("21600", None, "6h"),  # the run cannot last longer than its activeDeadlineSeconds
        ("7200", None, "2h"),
        ("90061", None, "90061s"),
        (str(3600 * 24 * 400), None, longest_key_life()),  # never past the proxy's longest
        (None, "90m", "90m"),  # as told
        ("21600", "8h", "8h"),
    ],
)
def test_a_key_lives_until_the_run_ends(
    deadline: str | None, expires_in: str | None, life: str
) -> None:
    """It got 2 hours (the issue step's default): a 6-hour run's pods got 401 after two. Its
    life is now the run's, bounded by the workflow's deadline and the proxy's longest key life,
    or --expires-in; whatever wrap writes, the issue step and the proxy take it."""
    from keybrake.proxy.money import parse_duration

    text = INVOICING
    if deadline is not None:
        text = text.replace(
            "entrypoint: invoice\n", f"entrypoint: invoice\n    activeDeadlineSeconds: {deadline}\n"
        )
    wrapped = wrap_text(text, WrapOptions(budget_usd=Decimal("40"), expires_in=expires_in))
    arguments = issue_arguments(wrapped.text, "stripe")
    assert arguments["expires_in"] == life
    request = issued(arguments)
    assert request.expires_in == life
    assert parse_duration(life) <= parse_duration(longest_key_life())
    (said,) = wrapped.keys
    assert life in said and "lives until the run ends" in said


def test_what_a_key_lives_is_checked_and_warned_about() -> None:
    text = INVOICING.replace(
        "entrypoint: invoice\n", "entrypoint: invoice\n    activeDeadlineSeconds: 21600\n"
    )
    short = wrap_text(text, WrapOptions(budget_usd=Decimal("40"), expires_in="2h"))
    assert any(
        "--expires-in 2h is shorter than the run's activeDeadlineSeconds (21600)" in w
        and "401" in w
        for w in short.warnings
    )
    long = wrap_text(text, WrapOptions(budget_usd=Decimal("40"), expires_in="30d"))
    assert any("longer than the proxy's longest key life" in w for w in long.warnings)
    for bad in ("2 hours", "0s", "-1h"):
        with pytest.raises(WrapError, match="--expires-in"):
            wrap_text(text, WrapOptions(budget_usd=Decimal("40"), expires_in=bad))
    unread = wrap_text(
        text.replace("21600", '"{{workflow.parameters.deadline}}"'),
        WrapOptions(budget_usd=Decimal("40")),
    )
    assert any("activeDeadlineSeconds" in w and "--expires-in" in w for w in unread.warnings)


def test_keys_drawing_on_a_budget_live_as_long_as_it() -> None:
    """Several vendors share one budget: the budget gets the run's life, and each key (issued
    with no life of its own) lives as long as the budget."""
    text = (WORKFLOWS / "before-billing-agent.yaml").read_text()
    text = text.replace(
        "            key: secret_key\n",
        "            key: secret_key\n"
        "      - name: TWILIO_AUTH_TOKEN\n"
        "        valueFrom:\n"
        "          secretKeyRef: {name: twilio, key: token}\n",
    )
    text = text.replace(
        "  entrypoint: main\n", "  entrypoint: main\n  activeDeadlineSeconds: 36000\n"
    )
    wrapped = wrap_text(text, OPTIONS)
    assert wrapped.vendors == ["stripe", "twilio"]
    main = {t["name"]: t for t in templates(load(wrapped.text))["keybrake-main"]["dag"]["tasks"]}
    budget = {p["name"]: p["value"] for p in main["keybrake-budget"]["arguments"]["parameters"]}
    assert budget["expires_in"] == "10h"
    for vendor in wrapped.vendors:
        arguments = issue_arguments(wrapped.text, vendor)
        assert arguments["expires_in"] == ""  # the budget's life, not the step's 2h
        assert issued(arguments).expires_in is None
    assert all(
        "the run's budget, and with it the key, expires after 10h" in k for k in wrapped.keys
    )


# --- --vendor names a vendor keybrake proxies, and never another's credential --------------------


def test_the_refusal_names_the_vendors_vendor_may_name() -> None:
    text = (WORKFLOWS / "single-pod-default-retry.yaml").read_text()
    text = text.replace("STRIPE_API_KEY", "PAYMENTS_API_KEY").replace("key: stripe", "key: api")
    text = text.replace("name: payments", "name: billing")
    with pytest.raises(WrapError) as refused:
        wrap_text(text, OPTIONS)
    assert (
        "if this is a Stripe, Twilio or Resend credential, name its vendor with --vendor "
        "(stripe or twilio or resend); if it is another vendor's, convert this template by hand"
    ) in str(refused.value)


@pytest.mark.parametrize(
    ("variable", "secret", "key"),
    [
        ("OPENAI_API_KEY", "stripe-credentials", "openai"),  # the Secret says Stripe: not enough
        ("API_KEY", "sendgrid", "api_key"),
        ("MAIL_TOKEN", "mail", "postmark_token"),
    ],
)
def test_vendor_never_turns_another_vendors_credential_into_a_vault_key(
    variable: str, secret: str, key: str
) -> None:
    """Whichever of its names (variable, Secret, key) says another vendor, with lint's knowledge
    of vendors' names (keybrake.adopt.credentials.VENDORS): refused, --vendor or not."""
    text = (WORKFLOWS / "single-pod-default-retry.yaml").read_text()
    text = text.replace("STRIPE_API_KEY", variable).replace("key: stripe", f"key: {key}")
    text = text.replace("name: payments", f"name: {secret}")
    for vendor in ("auto", "stripe"):
        with pytest.raises(WrapError, match="credential; keybrake proxies Stripe, Twilio and"):
            wrap_text(text, WrapOptions(budget_usd=Decimal("300"), vendor=vendor))


@pytest.mark.parametrize("variable", ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN"])
def test_vendor_never_turns_a_cloud_or_code_host_credential_into_a_vault_key(
    variable: str,
) -> None:
    text = (WORKFLOWS / "single-pod-default-retry.yaml").read_text()
    text = text.replace("STRIPE_API_KEY", variable).replace("key: stripe", "key: token")
    text = text.replace("name: payments", "name: ml-tokens")
    with pytest.raises(WrapError, match="credential; keybrake proxies"):
        wrap_text(text, WrapOptions(budget_usd=Decimal("300"), vendor="stripe"))


def test_vendor_takes_only_the_vendors_keybrake_proxies(tmp_path: Path) -> None:
    source = tmp_path / "billing.yaml"
    source.write_text((WORKFLOWS / "single-pod-default-retry.yaml").read_text())
    result = run(str(source), "--budget-usd", "5", "--vendor", "openai")
    assert result.exit_code == 2 and "openai" in result.output
    with pytest.raises(WrapError, match="--vendor 'openai'"):
        wrap_text(source.read_text(), WrapOptions(budget_usd=Decimal("5"), vendor="openai"))


# --- an env list shared by a YAML alias --------------------------------------------------------


def test_an_env_shared_by_an_alias_with_a_fanned_out_template_gets_each_its_own_tag() -> None:
    """The fanned-out template's item parameter was written into both: the plain template's pods
    failed on `inputs.parameters.customer`, which they do not have."""
    fixtures = Path(__file__).resolve().parent / "adopt" / "wrap_text"
    for name, fanned, plain, item in (
        ("shared-env.yaml", "charge", "summary", "customer"),  # `env: *stripe_env`
        ("entry-alias.yaml", "refund", "reconcile", "['charge-id']"),  # `- *stripe_entry`
    ):
        wrapped = wrap_text((fixtures / name).read_text(), OPTIONS)
        found = templates(load(wrapped.text))
        values = {
            t: {e["name"]: e.get("value") for e in found[t]["container"]["env"]}
            for t in (fanned, plain)
        }
        raw = "$(KEYBRAKE_VAULT_KEY_STRIPE_RAW)"
        reference = (
            f"inputs.parameters{item}" if item.startswith("[") else f"inputs.parameters.{item}"
        )
        assert values[fanned]["STRIPE_SECRET_KEY"] == (
            f"{raw}.{{{{=sprig.trunc(12, sprig.sha256sum({reference}))}}}}@{{{{pod.name}}}}"
        ), name
        assert values[plain]["STRIPE_SECRET_KEY"] == f"{raw}.{{{{pod.name}}}}", name
        for template in (fanned, plain):
            assert list(values[template]).count("KEYBRAKE_VAULT_KEY_STRIPE_RAW") == 1
        # The anchor stays with the template that defines it.
        assert "&stripe_" in wrapped.text


def test_a_deadline_of_non_ascii_digits_is_a_warning_not_a_traceback() -> None:
    """`"²".isdigit()` holds while `int("²")` fails: such a deadline is one wrap cannot read."""
    text = INVOICING.replace(
        "entrypoint: invoice\n", 'entrypoint: invoice\n    activeDeadlineSeconds: "²"\n'
    )
    wrapped = wrap_text(text, WrapOptions(budget_usd=Decimal("40")))
    assert any("activeDeadlineSeconds" in w and "--expires-in" in w for w in wrapped.warnings)
