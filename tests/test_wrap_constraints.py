"""`keybrake wrap --constraint FIELD=VALUE[,VALUE...] [--constraint-mode enforce|report]`: the
constraints go to what holds the run's cap (its one key, or with several vendors its budget), as
`keybrake keys issue --constraint` sends them; bad ones are a usage error (exit 2) that writes
nothing. That the wrapped run's issue steps send them to the proxy:
tests/hera/test_hera_simulated_runs.py."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from keybrake.adopt.wrap import WrapError, WrapOptions, wrap_text
from keybrake.hera_workflows._step_issue import build_budget_request
from keybrake.proxy.constraints import parse_constraints
from keybrake.proxy.models import BudgetCreate
from tests.test_wrap import WORKFLOWS, issue_arguments, issued, load, run, templates

BILLING = WORKFLOWS / "before-billing-agent.yaml"
SEVERAL_VENDORS = WORKFLOWS.parent / "wrap_text" / "two-vendors.yaml"  # Stripe, Twilio, Resend
CUSTOMERS = ("--constraint", "customers=cus_1, cus_2", "--constraint", "currencies=USD")


def test_one_vendors_key_is_issued_with_the_constraints(tmp_path: Path) -> None:
    source, out = tmp_path / "billing.yaml", tmp_path / "out.yaml"
    source.write_text(BILLING.read_text())
    result = run(str(source), "--budget-usd", "300", *CUSTOMERS, "-o", str(out))
    assert result.exit_code == 0, result.output

    arguments = issue_arguments(out.read_text(), "stripe")
    given = {"customers": ["cus_1", "cus_2"], "currencies": ["USD"]}
    assert arguments["constraints"] == (
        '{"customers": ["cus_1", "cus_2"], "currencies": ["USD"]}'
    )  # as `keys issue` sends them; the proxy makes them canonical
    # What the issue step then asks the proxy for, as the proxy reads it:
    assert issued(arguments).constraints == parse_constraints(given, "stripe").as_json()
    assert (
        "stripe key: may call POST /v1/payment_intents; spends at most $300 in the run "
        "(--budget-usd); its calls are held to customers cus_1, cus_2 and currencies USD "
        "(--constraint): the proxy refuses (403) any other call;"
    ) in result.stderr
    # By templateRef, the installed keybrake-vault-key must take them (Argo drops an argument a
    # template does not declare); copied in (--inline), it is this release's.
    assert "Argo drops, without an error" in result.stderr
    inline = run(str(source), "--budget-usd", "300", *CUSTOMERS, "--inline")
    assert inline.exit_code == 0 and "Argo drops" not in inline.stderr
    copied = templates(load(inline.stdout))["keybrake-issue"]
    assert "constraints" in {p["name"] for p in copied["inputs"]["parameters"]}


def test_without_constraints_nothing_is_passed_or_said() -> None:
    wrapped = wrap_text(BILLING.read_text(), WrapOptions(budget_usd=Decimal("300")))
    assert "constraints" not in issue_arguments(wrapped.text, "stripe")
    assert "constraints" not in wrapped.text
    assert not any("--constraint" in line for line in wrapped.keys + wrapped.notes)
    assert not any("Argo drops" in line for line in wrapped.notes)


def test_several_vendors_budget_holds_the_constraints_each_key_its_vendors() -> None:
    constraints = {"customers": ["cus_1"], "recipient_domains": ["example.com"], "mode": "report"}
    options = WrapOptions(budget_usd=Decimal("50"), constraints=constraints)
    wrapped = wrap_text(SEVERAL_VENDORS.read_text(), options)
    assert wrapped.vendors == ["resend", "stripe", "twilio"]
    main = {t["name"]: t for t in templates(load(wrapped.text))["keybrake-main"]["dag"]["tasks"]}
    budget = {p["name"]: p["value"] for p in main["keybrake-budget"]["arguments"]["parameters"]}
    env = {f"KEYBRAKE_{name.upper()}": value for name, value in budget.items()}
    request = build_budget_request({**env, "KEYBRAKE_LABEL": "argo/run"})
    assert BudgetCreate.model_validate(request).constraints == (
        parse_constraints(constraints).as_json()
    )
    for vendor in wrapped.vendors:  # the keys draw on the budget: none of their own
        assert "constraints" not in issue_arguments(wrapped.text, vendor), vendor
    said = {line.split(": ")[1]: line for line in wrapped.keys}
    reported = "the proxy forwards any other call and audits it as a would-be refusal"
    assert f"held to customers cus_1 (--constraint): {reported}" in said["stripe key"]
    assert f"held to recipient_domains example.com (--constraint): {reported}" in said["resend key"]
    assert "--constraint" not in said["twilio key"]  # none of its fields is constrained


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--constraint", "customers"], "--constraint 'customers': expected FIELD=VALUE"),
        (["--constraint", "=cus_1"], "expected FIELD=VALUE[,VALUE...]"),
        (["--constraint", "mode=report"], "give the mode as --constraint-mode"),
        (["--constraint-mode", "report"], "--constraint-mode: give the constraints too"),
        (
            ["--constraint", "currencies=usd", "--constraint-mode", "dry-run"],
            "--constraint-mode must be one of: enforce, report",
        ),
        (["--constraint", "customers=bob"], "'bob' is not a Stripe customer id"),
        (["--constraint", "payees=acct_1"], "constraints: unknown field 'payees'"),
        (["--constraint", "currencies="], "is not a three-letter ISO 4217 currency code"),
        (
            ["--constraint", "recipients=+4420*"],
            "--constraint recipients: a constraint of twilio calls, and the pods of "
            "Workflow/billing-agent- call stripe only",
        ),
    ],
)
def test_bad_constraints_are_a_usage_error_that_writes_nothing(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    source = tmp_path / "billing.yaml"
    source.write_text(BILLING.read_text())
    result = run(str(source), "--budget-usd", "300", *flags, "--in-place")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert source.read_text() == BILLING.read_text()


def test_the_library_refuses_what_the_command_would() -> None:
    options: dict[str, Any] = {"budget_usd": Decimal("5")}
    with pytest.raises(WrapError, match="constrain at least one of"):
        wrap_text(BILLING.read_text(), WrapOptions(**options, constraints={"mode": "report"}))
    only_twilio = WrapOptions(**options, constraints={"senders": ["+4420*"], "recipients": []})
    with pytest.raises(WrapError, match="recipients: a constraint of twilio calls, and the pods"):
        wrap_text(BILLING.read_text(), only_twilio)
