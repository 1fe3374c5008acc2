"""`keybrake lint` and `wrap` on the odd workflows a review found them wrong on
(tests/adopt/edge/): fields of the wrong shape, YAML aliases, both exit handlers, handler and
entrypoint inputs, hyphenated parameters, vendor values that are no credentials, go-templates in
scripts, inline templates, a 22-level call graph, and the file's own style (indentation, CRLF,
anchors). Each is held to what docs/lint.md and docs/wrap.md say."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from keybrake.adopt.lint import lint_paths
from keybrake.adopt.wrap import WrapError, WrapOptions, wrap_text
from keybrake.cli.main import app

EDGE = Path(__file__).resolve().parent / "adopt" / "edge"
OPTIONS = WrapOptions(budget_usd=Decimal("5"))


def wrapped(name: str, options: WrapOptions = OPTIONS) -> tuple[str, dict[str, Any]]:
    text = (EDGE / "wrap" / name).read_bytes().decode()
    out = wrap_text(text, options).text
    assert wrap_text(out, options).text == out  # wrapping again changes nothing
    return out, YAML(typ="safe").load(io.StringIO(out))


def templates(document: dict[str, Any]) -> dict[str, Any]:
    return {t["name"]: t for t in document["spec"]["templates"]}


@pytest.mark.parametrize("path", sorted((EDGE / "shapes").glob("*.yaml")), ids=lambda p: p.name)
def test_a_field_of_the_wrong_shape_is_a_clear_error_never_a_traceback(path: Path) -> None:
    result = CliRunner().invoke(app, ["lint", str(path), "-o", "sarif"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code in (0, 1, 2)
    assert "Traceback" not in result.output
    wrap = CliRunner().invoke(app, ["wrap", str(path), "--budget-usd", "5"])
    assert wrap.exception is None or isinstance(wrap.exception, SystemExit), wrap.output
    assert wrap.exit_code in (0, 2)


def test_an_env_list_shared_by_an_alias_is_rewritten_once() -> None:
    _, document = wrapped("anchors.yaml")
    found = templates(document)
    for name in ("charge", "refund"):
        env = {e["name"]: e for e in found[name]["container"]["env"]}
        assert env["STRIPE_SECRET_KEY"]["value"].startswith("$(KEYBRAKE_VAULT_KEY_STRIPE_RAW)")


def test_values_of_a_vendor_that_are_no_credentials_stay() -> None:
    _, document = wrapped("twilio.yaml")
    env = {e["name"]: e for e in templates(document)["send"]["container"]["env"]}
    assert env["TWILIO_AUTH_TOKEN"]["value"].startswith("$(KEYBRAKE_VAULT_KEY_TWILIO_RAW)")
    for kept in ("TWILIO_ACCOUNT_SID", "TWILIO_MESSAGING_SERVICE_SID", "TWILIO_FROM_NUMBER"):
        assert "secretKeyRef" in env[kept]["valueFrom"], kept
    assert "secretKeyRef" in env["STRIPE_WEBHOOK_SECRET"]["valueFrom"]  # a signing secret
    assert "keybrake-stripe-key" not in templates(document)


def test_the_exit_handler_argo_runs_is_the_one_kept_and_gets_its_inputs() -> None:
    _, both = wrapped("both_exit.yaml")
    (first, *_) = templates(both)["keybrake-exit"]["dag"]["tasks"]
    assert first["template"] == "notify" and both["spec"]["onExit"] == "keybrake-exit"
    _, with_inputs = wrapped("exit_inputs.yaml")
    (first, *_) = templates(with_inputs)["keybrake-exit"]["dag"]["tasks"]
    assert first["arguments"]["parameters"] == [
        {"name": "channel", "value": "{{workflow.parameters.channel}}"}
    ]


def test_a_hyphenated_item_parameter_is_read_with_brackets() -> None:
    text, _ = wrapped("hyphen.yaml")
    assert "sprig.sha256sum(inputs.parameters['customer-ids'])" in text


def test_an_existing_base_url_is_pointed_at_the_proxy() -> None:
    _, document = wrapped("baseurl.yaml")
    (template,) = [t for t in document["spec"]["templates"] if "container" in t]
    env = {e["name"]: e for e in template["container"]["env"]}
    assert env["STRIPE_BASE_URL"]["value"].endswith("/stripe")
    assert "api.stripe.com" not in env["STRIPE_BASE_URL"]["value"]


def test_a_container_set_member_named_main() -> None:
    _, document = wrapped("cset.yaml")
    assert "keybrake-stripe-key" in templates(document)


def test_the_files_own_style_is_kept() -> None:
    four = (EDGE / "wrap" / "indent4.yaml").read_text()
    out, _ = wrapped("indent4.yaml")
    assert "        -   name: other" in out and "        -   name: other" in four
    crlf = (EDGE / "wrap" / "crlf.yaml").read_bytes().decode()
    assert "\r\n" in crlf
    out, _ = wrapped("crlf.yaml")
    assert out.count("\r\n") == out.count("\n")
    out, _ = wrapped("backoff.yaml")
    assert "&id" not in out and "*id" not in out  # no alias made up by the copy


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("inline.yaml", "inline template of step"),
        ("existing_kbmain.yaml", "already has templates keybrake-main"),
        ("entry_missing.yaml", "entrypoint 'nonexistent' is no template"),
        ("psp.yaml", "podSpecPatch"),
    ],
)
def test_refused(name: str, why: str) -> None:
    with pytest.raises(WrapError, match=why):
        wrap_text((EDGE / "wrap" / name).read_text(), OPTIONS)


def test_lint_on_the_same_files() -> None:
    report = lint_paths([EDGE / "wrap"])
    by_file: dict[str, set[tuple[str, str | None]]] = {}
    for finding in report.findings:
        by_file.setdefault(finding.path.name, set()).add((finding.rule, finding.template))
    # A go-template in a script is no Helm chart: the file is linted.
    assert ("KB101", "charge") in by_file["gotmpl.yaml"]
    assert not report.skipped
    # An inline template is linted as <template>/<step>.
    assert any(t and "/" in t for rule, t in by_file["inline.yaml"] if rule == "KB101")
    # No retry (limit 0) repeats nothing.
    assert not any(rule == "KB102" for rule, _ in by_file["limit0.yaml"])
    # A workflow-wide podSpecPatch reaches pod templates only.
    assert {t for rule, t in by_file["psp.yaml"] if rule == "KB101"} == {"work"}
    # onExit wins over hooks.exit: a revoke in hooks.exit does not count.
    assert ("KB104", None) in by_file["kb104.yaml"]
    # 22 levels of templates each calling the next twice: walked once each.
    assert ("KB101", "t22") in by_file["deep.yaml"]
    (deep,) = [f for f in report.findings if f.path.name == "deep.yaml" and f.rule == "KB101"]
    assert deep.severity == "high"  # fanned out 22 levels up


REVIEW2 = EDGE / "review2"


def test_an_http_template_sending_a_vendor_secret() -> None:
    report = lint_paths([REVIEW2 / "http.yaml"])
    found = {(f.rule, f.severity) for f in report.findings}
    assert {("KB101", "high"), ("KB102", "high"), ("KB103", "high"), ("KB105", "medium")} <= found
    with pytest.raises(WrapError, match="HTTP template"):
        wrap_text((REVIEW2 / "http.yaml").read_text(), OPTIONS)


def test_parallelism_must_bound_each_fanning_level() -> None:
    """On the fanned-out template itself it bounds nothing; nested, each level needs one."""
    for name in ("leafpar.yaml", "nested_inner_bounded.yaml"):
        rules = {f.rule for f in lint_paths([REVIEW2 / name]).findings}
        assert "KB105" in rules, name


def test_refusal_exit_code_keeps_onerror_and_joins_an_expression() -> None:
    options = WrapOptions(budget_usd=Decimal("5"), refusal_exit_code=77)
    _, document = wrapped("../review2/onerror.yaml", options)
    assert templates(document)["charge"]["retryStrategy"] == {"limit": 3, "retryPolicy": "OnError"}
    own = (
        (REVIEW2 / "onerror.yaml")
        .read_text()
        .replace(
            "retryPolicy: OnError",
            'retryPolicy: Always\n      expression: "lastRetry.status == \\"Failed\\""',
        )
    )
    strategy = templates(YAML(typ="safe").load(wrap_text(own, options).text))["charge"][
        "retryStrategy"
    ]
    assert strategy["expression"] == (
        '(lastRetry.status == "Failed") && asInt(lastRetry.exitCode) != 77'
    )


def test_a_wrapped_library_needs_its_callers_to_issue(tmp_path: Path) -> None:
    out = wrap_text((REVIEW2 / "lib_with_entry.yaml").read_text(), OPTIONS)
    assert any("must issue one too" in note for note in out.notes)
    folder = tmp_path
    (folder / "lib.yaml").write_text(out.text)
    (folder / "caller.yaml").write_text((REVIEW2 / "caller.yaml").read_text())
    report = lint_paths([folder])
    caller = [f for f in report.findings if f.path.name == "caller.yaml"]
    assert [f.rule for f in caller] == ["KB103"]
    assert "payments/charge (templateRef)" in caller[0].message


def test_yaml_nested_too_deep_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 3000 + "]" * 3000 + "\n")
    result = CliRunner().invoke(app, ["lint", str(deep)])
    assert result.exit_code == 2 and "nested too deep" in result.output
    wrap = CliRunner().invoke(app, ["wrap", str(deep), "--budget-usd", "5"])
    assert wrap.exit_code == 2 and "nested too deep" in wrap.output


@pytest.mark.parametrize("budget", ["NaN", "-5", "Infinity", "1e999999999"])
def test_lint_diff_budget_is_checked(budget: str) -> None:
    result = CliRunner().invoke(
        app, ["lint", str(REVIEW2 / "onerror.yaml"), "--diff", "--budget-usd", budget]
    )
    assert result.exit_code == 2 and "--budget-usd" in result.output
