"""`keybrake lint` measured on a corpus of workflow files (tests/corpus/lint/): files from public
repositories (PROVENANCE.json says where from, LICENSES.md under which licence) and files
synthesised for it, so that every rule has cases enough. labels.yaml is the ground truth,
written by hand from docs/lint.md; each rule's precision and recall against it is printed
(`pytest -s`) and must be at least 0.9, and no file without a Stripe, Twilio or Resend
credential gets a high finding. Then the two things trying lint on public workflows found, one
test each: spend findings for credentials keybrake cannot cap, and templateRef entrypoints
not judged like other callers."""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from keybrake.adopt.lint import RULES, Report, lint_paths
from keybrake.adopt.report import as_sarif
from keybrake.adopt.wrap import WrapOptions, wrap_text
from keybrake.cli.main import app
from keybrake.proxy.vendor_facts import VENDOR_NAMES

CORPUS = Path(__file__).resolve().parent / "corpus" / "lint"
FOLDERS = ("public", "synthesised")
THRESHOLD = 0.9
MIN_POSITIVES = 8
MIN_PUBLIC_FILES = 25

# (file, workflow, rule, severity, template, subject); `-` for no template or subject.
Key = tuple[str, str, str, str, str, str]


def _labels() -> dict[str, Any]:
    data = yaml.safe_load((CORPUS / "labels.yaml").read_text(encoding="utf-8"))
    files: dict[str, Any] = data["files"]
    return files


def _corpus_files() -> set[str]:
    return {
        path.relative_to(CORPUS).as_posix()
        for folder in FOLDERS
        for path in (CORPUS / folder).rglob("*")
        if path.suffix in (".yaml", ".yml")
    }


def expected_findings() -> Counter[Key]:
    expected: Counter[Key] = Counter()
    for file, label in _labels().items():
        for workflow, lines in (label["expected"] or {}).items():
            for line in lines:
                rule, severity, template, subject = line.split(" ", 3)
                expected[(file, workflow, rule, severity, template, subject)] += 1
    return expected


def found_findings(report: Report) -> Counter[Key]:
    return Counter(
        (
            f.path.relative_to(CORPUS).as_posix(),
            f.workflow,
            f.rule,
            f.severity,
            f.template or "-",
            f.subject or "-",
        )
        for f in report.findings
    )


def measure(expected: Counter[Key], found: Counter[Key]) -> dict[str, tuple[int, int, int]]:
    """Per rule: (true positives, false positives, false negatives)."""
    counts = {}
    for rule in RULES:
        want = Counter({k: n for k, n in expected.items() if k[2] == rule})
        got = Counter({k: n for k, n in found.items() if k[2] == rule})
        hits = sum((want & got).values())
        counts[rule] = (hits, sum(got.values()) - hits, sum(want.values()) - hits)
    return counts


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 1.0


def table(counts: dict[str, tuple[int, int, int]]) -> str:
    lines = ["rule   name                         TP  FP  FN  precision  recall"]
    for rule, (tp, fp, fn) in counts.items():
        lines.append(
            f"{rule}  {RULES[rule].name:<27} {tp:>3} {fp:>3} {fn:>3}  "
            f"{_ratio(tp, tp + fp):>9.2f}  {_ratio(tp, tp + fn):>6.2f}"
        )
    return "\n".join(lines)


@pytest.fixture(scope="module")
def report() -> Report:
    return lint_paths([CORPUS / folder for folder in FOLDERS])


def test_every_file_is_labelled_and_sourced() -> None:
    files = _corpus_files()
    assert set(_labels()) == files
    provenance = json.loads((CORPUS / "PROVENANCE.json").read_text(encoding="utf-8"))
    by_file = {row["file"]: row for row in provenance["files"]}
    assert set(by_file) == files
    public = [row for row in by_file.values() if row["origin"] == "public"]
    assert len(public) >= MIN_PUBLIC_FILES
    for row in public:
        assert row["repository"] and row["path"] and row["licence"], row
        assert len(row["commit"] or "") == 40 or row.get("commit_unknown"), row
        assert isinstance(row["trimmed"], bool) and (row.get("trim") or not row["trimmed"]), row
    for row in by_file.values():
        if row["origin"] == "synthesised":
            first = (CORPUS / row["file"]).read_text(encoding="utf-8").splitlines()[0]
            assert first.startswith("# SYNTHESISED"), row["file"]
    kinds = {
        document.get("kind")
        for file in files
        for document in yaml.safe_load_all((CORPUS / file).read_text(encoding="utf-8"))
        if isinstance(document, dict)
    }
    assert {"Workflow", "WorkflowTemplate", "ClusterWorkflowTemplate", "CronWorkflow"} <= kinds


def test_every_rule_has_cases_enough() -> None:
    positives = Counter(key[2] for key in expected_findings().elements())
    assert {rule: positives[rule] for rule in RULES} == {
        rule: max(positives[rule], MIN_POSITIVES) for rule in RULES
    }


def test_precision_and_recall_of_each_rule(report: Report) -> None:
    assert not report.unreadable and not report.skipped
    expected, found = expected_findings(), found_findings(report)
    counts = measure(expected, found)
    shown = table(counts)
    print(f"\nkeybrake lint on tests/corpus/lint ({len(_corpus_files())} files)\n{shown}")
    missed = sorted((expected - found).elements())
    extra = sorted((found - expected).elements())
    for rule, (tp, fp, fn) in counts.items():
        assert _ratio(tp, tp + fp) >= THRESHOLD and _ratio(tp, tp + fn) >= THRESHOLD, (
            f"{rule} below {THRESHOLD}:\n{shown}\nmissed: {missed}\nextra: {extra}"
        )


def test_no_high_finding_without_a_proxiable_credential(report: Report) -> None:
    labels = _labels()
    high = sorted(
        f"{f.path.relative_to(CORPUS).as_posix()}:{f.line} {f.rule}"
        for f in report.findings
        if f.severity == "high" and not labels[f.path.relative_to(CORPUS).as_posix()]["proxiable"]
    )
    assert high == []


def test_the_corpus_as_sarif_is_valid_sarif_2_1_0(report: Report) -> None:
    schema = json.loads((CORPUS.parent.parent / "sarif" / "sarif-schema-2.1.0.json").read_text())
    sarif = json.loads(as_sarif(report, "0"))
    jsonschema.Draft4Validator(schema).validate(sarif)
    levels = {r["ruleId"]: r["level"] for r in sarif["runs"][0]["results"]}
    assert levels["KB107"] == "note"


SYNTHESISED = CORPUS / "synthesised"


def test_a_credential_keybrake_cannot_cap_is_noted_never_a_spend_risk() -> None:
    # AWS, Hugging Face, GitHub, vector databases, Redis, a database, OpenAI: fanned out,
    # retried, unbounded — and no Stripe, Twilio or Resend key among them.
    path = SYNTHESISED / "syn-ml-uncappable.yaml"
    findings = lint_paths([path]).findings
    assert {(f.rule, f.severity) for f in findings} == {("KB107", "low")}
    assert len(findings) == 9
    rule = RULES["KB107"]
    assert "wrap" not in f"{rule.summary} {rule.fix}"
    assert all("keybrake cannot cap it" in f.message and "wrap" not in f.message for f in findings)
    # A team keeping lint in CI: the default threshold passes, an explicit `low` does not.
    assert CliRunner().invoke(app, ["lint", str(path)]).exit_code == 0
    assert CliRunner().invoke(app, ["lint", str(path), "--fail-on", "low"]).exit_code == 1
    # Beside a Stripe key in the same pod: the Stripe key is the spend risk, the database
    # password is noted.
    mixed = lint_paths([SYNTHESISED / "syn-mixed-stripe-and-db.yaml"]).findings
    assert {(f.rule, f.template, f.subject) for f in mixed} == {
        ("KB101", "refund", "STRIPE_API_KEY"),
        ("KB107", "refund", "DATABASE_PASSWORD"),
        ("KB107", "load", "DATABASE_PASSWORD"),
        ("KB103", None, ""),
    }
    (kb103,) = [f for f in mixed if f.rule == "KB103"]
    assert "templates refund hold" in kb103.message


def test_the_proxied_vendors_are_read_from_vendor_facts() -> None:
    for name in VENDOR_NAMES:
        assert name.capitalize() in RULES["KB101"].summary
        assert name.capitalize() in RULES["KB107"].summary


def test_templateref_entrypoints_are_judged_like_other_callers() -> None:
    report = lint_paths([SYNTHESISED])
    kb103 = {f.workflow for f in report.findings if f.rule == "KB103"}
    assert {
        # a CronWorkflow whose entrypoint's step runs a library template reaching a Twilio key
        "CronWorkflow/syn-nightly-sms",
        # a CronWorkflow whose entrypoint template is itself a templateRef
        "CronWorkflow/syn-hourly-sms",
        # a CronWorkflow running a whole WorkflowTemplate (workflowTemplateRef)
        "CronWorkflow/syn-sms-every-morning",
        # a fan-out of that library template
        "Workflow/syn-broadcast-",
    } <= kb103
    by_file = {(f.path.name, f.rule, f.severity, f.template) for f in report.findings}
    # The library's pod is fanned out through the template the fan-out calls.
    assert ("syn-lib-notify.yaml", "KB101", "high", "send-sms") in by_file
    assert ("syn-fanout-library-call.yaml", "KB105", "medium", "main") in by_file


def test_the_names_only_lint_looks_for_leave_wrap_as_it_was(tmp_path: Path) -> None:
    # A Stripe key beside a registry's auth (docker-config, found by lint's broader names only):
    # lint notes the one and judges the other; wrap still converts the Stripe key.
    text = """\
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata:
  generateName: build-and-bill-
spec:
  entrypoint: bill
  templates:
  - name: bill
    volumes:
    - name: docker-config
      secret: {secretName: docker-config}
    container:
      image: registry.example.com/bill:1
      volumeMounts:
      - {name: docker-config, mountPath: /.docker}
      env:
      - name: STRIPE_SECRET_KEY
        valueFrom:
          secretKeyRef: {name: stripe, key: secret_key}
"""
    path = tmp_path / "wf.yaml"
    path.write_text(text, encoding="utf-8")
    found = {(f.rule, f.subject) for f in lint_paths([path]).findings}
    assert found == {("KB101", "STRIPE_SECRET_KEY"), ("KB107", "docker-config"), ("KB103", "")}
    wrapped = wrap_text(text, WrapOptions(budget_usd=Decimal("5")))
    assert wrapped.vendors == ["stripe"] and "keybrake-stripe-key" in wrapped.text
