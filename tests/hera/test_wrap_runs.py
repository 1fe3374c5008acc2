"""`keybrake wrap`'s output passes Argo's schema and CRD in strict mode and the semantic checks,
and `keybrake lint` finds nothing high in it. That the output runs — the "before" billing
workflow wrapped and run in the Argo simulator, its pods as processes, against the proxy in front
of localstripe — is tests/e2e/hera/test_wrap_runs_processes.py."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path
from typing import Any

from argocheck.schema import all_errors
from argocheck.semantics import Catalog, problems
from ruamel.yaml import YAML

from keybrake.adopt.lint import lint_paths
from keybrake.adopt.wrap import WrapOptions, wrap_text

WORKFLOWS = Path(__file__).resolve().parents[1] / "adopt" / "workflows"


def load(text: str) -> dict[str, Any]:
    document: dict[str, Any] = YAML(typ="safe").load(io.StringIO(text))
    return document


def test_wrapped_examples_pass_argo_checks_and_lint(
    catalog: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Every wrappable workflow of tests/adopt/workflows/, wrapped: schema and CRD (strict),
    semantics, and `keybrake lint` finds nothing high in it."""
    folder = WORKFLOWS
    for name, inline, namespaced in (
        ("before-billing-agent.yaml", False, False),
        ("before-billing-agent.yaml", True, False),
        ("before-billing-agent.yaml", False, True),
        ("steps-bounded-onerror.yaml", False, True),
        ("single-pod-default-retry.yaml", True, False),
        ("nested-fanout.yaml", False, False),
    ):
        options = WrapOptions(
            budget_usd=Decimal("300"), refusal_exit_code=77, inline=inline, namespaced=namespaced
        )
        wrapped = wrap_text((folder / name).read_text(), options)
        assert wrapped.changed, name
        document = load(wrapped.text)
        if "generateName" in document["metadata"]:
            document["metadata"]["name"] = document["metadata"].pop("generateName") + "x"
        assert all_errors(document) == [], name
        # Inlined, it needs nothing installed: an empty catalog.
        assert problems(document, Catalog([] if inline else catalog)) == [], name
        if inline:
            assert "templateRef" not in wrapped.text
        assert ("clusterScope" in wrapped.text) is not (inline or namespaced)
        out = tmp_path / name
        out.write_text(wrapped.text)
        report = lint_paths([out])
        assert [f for f in report.findings if f.severity == "high"] == [], (name, report)


def test_a_wrapped_cron_workflow_passes_argo_checks(catalog: list[dict[str, Any]]) -> None:
    """A CronWorkflow's runs are wrapped in its workflowSpec; the output is a CronWorkflow Argo
    v4.1.2 accepts (schema and CRD, strict), whose workflow passes the semantic checks."""
    text = """\
apiVersion: argoproj.io/v1alpha1
kind: CronWorkflow
metadata:
  name: nightly-invoices   # every morning at six
spec:
  schedules: ["0 6 * * *"]
  concurrencyPolicy: Forbid
  workflowSpec:
    entrypoint: invoice
    onExit: report
    templates:
    - name: invoice
      retryStrategy: {limit: 2}
      container:
        image: registry.example.com/invoices:3
        env:
        - name: STRIPE_API_KEY
          valueFrom: {secretKeyRef: {name: stripe, key: api_key}}
    - name: report
      container: {image: registry.example.com/report:1}
"""
    wrapped = wrap_text(text, WrapOptions(budget_usd=Decimal("40")))
    assert wrapped.changed and "# every morning at six" in wrapped.text
    document = load(wrapped.text)
    assert all_errors(document) == []
    spec = document["spec"]["workflowSpec"]
    assert spec["entrypoint"] == "keybrake-main" and spec["onExit"] == "keybrake-exit"
    workflow = {
        "apiVersion": document["apiVersion"],
        "kind": "Workflow",
        "metadata": {"name": "nightly-invoices-1"},
        "spec": spec,
    }
    assert problems(workflow, Catalog(catalog)) == []
    assert not wrap_text(wrapped.text, WrapOptions(budget_usd=Decimal("40"))).changed
