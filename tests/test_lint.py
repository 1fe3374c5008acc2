"""`keybrake lint`: each rule on realistic workflows written for it (tests/adopt/workflows/, each
file saying what it shows), positively and negatively; Argo's own examples and keybrake's shipped
templates lint clean; the SARIF output validates against the SARIF 2.1.0 schema
(tests/sarif/PROVENANCE.md); exit codes and settings through the command itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from keybrake.adopt.lint import RULES, lint_paths
from keybrake.cli.main import app

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE / "adopt" / "workflows"
ROOT = HERE.parent

# file -> every finding expected in it: (rule, severity, template or None).
EXPECTED: dict[str, set[tuple[str, str, str | None]]] = {
    "before-billing-agent.yaml": {
        ("KB101", "high", "charge-batch"),
        ("KB102", "high", "charge-batch"),
        ("KB103", "high", None),
        ("KB105", "medium", "charge-batch"),
    },
    # parallelism on the workflow, OnError retries: no KB102, no KB105.
    "steps-bounded-onerror.yaml": {("KB101", "high", "send-sms"), ("KB103", "high", None)},
    # not fanned out: KB101 is medium; a bare `limit` retries OnFailure.
    "single-pod-default-retry.yaml": {
        ("KB101", "medium", "invoice"),
        ("KB102", "high", "invoice"),
        ("KB103", "high", None),
    },
    "converted.yaml": set(),  # the vault-key pattern: nothing to say
    # It runs payments-lib.yaml's refund-one (a Stripe key) by templateRef, fanned out.
    "library-call.yaml": {("KB103", "high", None), ("KB105", "medium", "main")},
    # fanned out from library-call.yaml by templateRef: high; no entrypoint: no KB103.
    "payments-lib.yaml": {("KB101", "high", "refund-one"), ("KB102", "high", "refund-one")},
    "cron-envfrom.yaml": {("KB101", "medium", "send"), ("KB103", "high", None)},
    # the sidecar's password Secret is annotated internal; the init container's OpenAI key is no
    # key keybrake proxies: noted (KB107), no spend finding.
    "init-and-sidecar.yaml": {("KB107", "low", "summarise")},
    "issues-without-revoke.yaml": {
        ("KB104", "high", None),
        ("KB106", "info", "main"),
    },
    "nested-fanout.yaml": {
        ("KB101", "high", "charge"),
        ("KB103", "high", None),
        ("KB105", "medium", "charge"),
    },
    # The SendGrid key templateDefaults gives container templates (mail, pay) is no key keybrake
    # proxies: KB107.
    "defaults-volumes-patch.yaml": {
        ("KB107", "low", "mail"),
        ("KB107", "low", "pay"),
        ("KB101", "medium", "sms"),
        ("KB101", "medium", "pay"),
        ("KB103", "high", None),
    },
    # KB105 silenced for the document, KB102 for charge-batch only.
    "silenced.yaml": {("KB101", "high", "charge-batch"), ("KB103", "high", None)},
    "not-argo.yaml": set(),  # a Deployment: not an Argo kind
}


@pytest.fixture(scope="module")
def report():  # type: ignore[no-untyped-def]
    return lint_paths([WORKFLOWS])


def test_every_fixture_is_in_the_table() -> None:
    assert {p.name for p in WORKFLOWS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_findings_of_each_workflow(report, name: str) -> None:  # type: ignore[no-untyped-def]
    found = {(f.rule, f.severity, f.template) for f in report.findings if f.path.name == name}
    assert found == EXPECTED[name]


def test_every_rule_fires_somewhere_and_is_silent_somewhere(report) -> None:  # type: ignore[no-untyped-def]
    fired = {f.rule for f in report.findings}
    assert fired == set(RULES)
    silent_files = {name for name, expected in EXPECTED.items() if not expected}
    assert {"converted.yaml", "not-argo.yaml"} <= silent_files


def test_findings_point_at_the_line_and_say_how_to_fix(report) -> None:  # type: ignore[no-untyped-def]
    before = WORKFLOWS / "before-billing-agent.yaml"
    lines = before.read_text().splitlines()
    by_rule = {f.rule: f for f in report.findings if f.path == before}
    assert lines[by_rule["KB101"].line - 1].strip() == "- name: STRIPE_SECRET_KEY"
    assert lines[by_rule["KB102"].line - 1].strip() == 'limit: "3"'
    assert lines[by_rule["KB105"].line - 1].strip() == "- name: charge"
    assert lines[by_rule["KB103"].line - 1].strip() == "spec:"
    assert "Secret 'stripe-credentials' key 'secret_key'" in by_rule["KB101"].message
    assert "retryPolicy Always" in by_rule["KB102"].message
    assert all(f.fix for f in report.findings)


def test_argo_examples_and_the_shipped_templates_lint_clean() -> None:
    examples = lint_paths([HERE / "argo" / "examples"])
    assert examples.files == 11 and examples.workflows == 19  # multi-document files
    assert examples.findings == [] and not examples.unreadable
    shipped = lint_paths([ROOT / "templates"])
    assert shipped.workflows >= 4 and not shipped.unreadable
    assert [f for f in shipped.findings if f.severity != "info"] == []


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["lint", *args])
    return result.exit_code, result.stdout


def test_exit_codes_and_fail_on() -> None:
    clean = WORKFLOWS / "converted.yaml"
    medium_only = WORKFLOWS / "library-call.yaml"
    assert run(str(clean))[0] == 0
    code, out = run(str(WORKFLOWS / "before-billing-agent.yaml"))
    assert code == 1 and "KB101" in out and "fix:" in out
    assert run(str(WORKFLOWS / "before-billing-agent.yaml"), "--fail-on", "never")[0] == 0
    # Only medium findings: fails at medium (the default), passes at high.
    cron = WORKFLOWS / "cron-envfrom.yaml"
    assert run(str(cron), "--fail-on", "high")[0] == 1  # KB103 is high
    assert run(str(medium_only), "--fail-on", "low")[0] == 0
    # info never fails a build.
    code, out = run(str(WORKFLOWS / "issues-without-revoke.yaml"), "--fail-on", "high")
    assert code == 1  # KB104 is high
    code, out = run(str(HERE / "adopt" / "helm"))
    assert code == 0 and "skipped: Helm-templated" in out
    code, out = run(str(HERE / "adopt" / "broken.yaml"), str(clean))
    assert code == 2 and "not valid YAML (line 4)" in out
    code, out = run(str(HERE / "adopt" / "no-such-file.yaml"))
    assert code == 2 and "no such file" in out


def test_json_output(tmp_path: Path) -> None:
    code, out = run(str(WORKFLOWS / "before-billing-agent.yaml"), "-o", "json")
    data = json.loads(out)
    assert code == 1
    rules = {f["rule"] for f in data["findings"]}
    assert rules == {"KB101", "KB102", "KB103", "KB105"}
    first = data["findings"][0]
    assert set(first) == {
        "rule",
        "name",
        "severity",
        "file",
        "line",
        "workflow",
        "template",
        "message",
        "fix",
    }


def test_sarif_output_is_valid_sarif_2_1_0() -> None:
    schema = json.loads((HERE / "sarif" / "sarif-schema-2.1.0.json").read_text())
    code, out = run(str(WORKFLOWS), str(HERE / "adopt" / "helm"), "-o", "sarif")
    assert code == 1
    sarif = json.loads(out)
    jsonschema.Draft4Validator.check_schema(schema)
    jsonschema.Draft4Validator(schema).validate(sarif)
    (run_,) = sarif["runs"]
    assert {r["id"] for r in run_["tool"]["driver"]["rules"]} == set(RULES)
    levels = {r["ruleId"]: r["level"] for r in run_["results"]}
    assert levels["KB101"] in ("error", "warning") and levels["KB106"] == "note"
    location = run_["results"][0]["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"].startswith("tests/adopt/workflows/")
    assert location["region"]["startLine"] >= 1
    notes = run_["invocations"][0]["toolExecutionNotifications"]
    assert any("Helm-templated" in n["message"]["text"] for n in notes)


def test_internal_secrets_from_the_settings_file(tmp_path: Path) -> None:
    workflow = tmp_path / "wf.yaml"
    workflow.write_text((WORKFLOWS / "single-pod-default-retry.yaml").read_text())
    assert run(str(tmp_path))[0] == 1
    (tmp_path / ".keybrake-lint.yaml").write_text("internal_secrets: [payments]\n")
    code, out = run(str(tmp_path))
    assert code == 0 and "no findings" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("internal_secrets: payments\n")
    result = CliRunner().invoke(app, ["lint", str(workflow), "--config", str(bad)])
    assert result.exit_code == 2 and "internal_secrets must be a list" in result.output
    assert "Traceback" not in result.output


def test_diff_shows_what_wrap_would_change() -> None:
    result = CliRunner().invoke(
        app,
        [
            "lint",
            str(WORKFLOWS / "single-pod-default-retry.yaml"),
            str(WORKFLOWS / "cron-envfrom.yaml"),
            "--diff",
            "--budget-usd",
            "50",
        ],
    )
    assert result.exit_code == 1  # the findings still fail the build
    assert "+  entrypoint: keybrake-main" in result.stdout
    assert '+            value: "50"' in result.stdout
    assert "cron-envfrom.yaml: cannot convert: CronWorkflow/nightly-digest template send" in (
        result.stdout
    )
    usage = CliRunner().invoke(app, ["lint", str(WORKFLOWS), "--diff"])
    assert usage.exit_code == 2 and "--diff needs --budget-usd" in usage.output


def test_sarif_locations_are_uris(tmp_path: Path) -> None:
    folder = tmp_path / "my flows"
    folder.mkdir()
    (folder / "ünï[1].yaml").write_text((WORKFLOWS / "cron-envfrom.yaml").read_text())
    _, out = run(str(folder), "-o", "sarif")
    (result, *_) = json.loads(out)["runs"][0]["results"]
    uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri.startswith("file:///") and "my%20flows/%C3%BCn%C3%AF%5B1%5D.yaml" in uri
    levels = {
        r["id"]: r["defaultConfiguration"]["level"]
        for r in json.loads(out)["runs"][0]["tool"]["driver"]["rules"]
    }
    assert levels == {
        "KB101": "warning",
        "KB102": "error",
        "KB103": "error",
        "KB104": "error",
        "KB105": "warning",
        "KB106": "note",
        "KB107": "note",
    }


def test_a_library_template_run_twice_is_named_once(tmp_path: Path) -> None:
    """KB103 listed `payments-lib/refund-one (templateRef)` once per step that ran it."""
    shutil.copy(WORKFLOWS / "payments-lib.yaml", tmp_path)
    (tmp_path / "twice.yaml").write_text(
        "apiVersion: argoproj.io/v1alpha1\n"
        "kind: Workflow\n"
        "metadata: {generateName: twice-}\n"
        "spec:\n"
        "  entrypoint: main\n"
        "  templates:\n"
        "  - name: main\n"
        "    steps:\n"
        "    - - name: first\n"
        "        templateRef: {name: payments-lib, template: refund-one}\n"
        "    - - name: second\n"
        "        templateRef: {name: payments-lib, template: refund-one}\n"
    )
    found = [f for f in lint_paths([tmp_path]).findings if f.rule == "KB103"]
    assert len(found) == 1
    assert found[0].message.count("payments-lib/refund-one") == 1, found[0].message
