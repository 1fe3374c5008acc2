"""What the schemas cannot see: every reference in the rendered documents resolves, every
`{{...}}` is a variable Argo defines there; and each kind of broken reference is reported."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from argocheck.semantics import Catalog, parse_depends, problems
from hera_fixtures import upstream_examples

from keybrake.hera_workflows.render import RenderedFile, rendered_files

FANOUT = "workflowtemplates/keybrake-fanout.yaml"
Document = dict[str, Any]


@pytest.mark.parametrize("rendered_file", rendered_files(), ids=lambda f: f.path)
def test_rendered_documents_resolve(rendered_file: RenderedFile, catalog: list[Document]) -> None:
    assert problems(rendered_file.document, Catalog(catalog)) == []


def test_the_checker_accepts_argos_own_examples() -> None:
    examples = [document for _, document in upstream_examples()]
    for document in examples:
        assert problems(document, Catalog(examples)) == [], document["metadata"]


def _template(document: Document, name: str) -> Document:
    return next(t for t in document["spec"]["templates"] if t["name"] == name)


def _task(document: Document, template: str, task: str) -> Document:
    return next(t for t in _template(document, template)["dag"]["tasks"] if t["name"] == task)


def _argument(task: Document, name: str) -> Document:
    return next(p for p in task["arguments"]["parameters"] if p["name"] == name)


def _env(document: Document, template: str, name: str) -> Document:
    body = _template(document, template)
    container = body.get("script") or body["container"]
    return next(e for e in container["env"] if e["name"] == name)


BREAKAGES: dict[str, tuple[Callable[[Document], None], str]] = {
    "entrypoint": (lambda d: d["spec"].__setitem__("entrypoint", "mian"), "spec.entrypoint"),
    "onExit": (lambda d: d["spec"].__setitem__("onExit", "keybrake-revok"), "spec.onExit"),
    "task-template": (
        lambda d: _task(d, "main", "run").__setitem__("template", "runn"),
        "template 'runn' does not exist",
    ),
    "templateRef-name": (
        lambda d: (
            _task(d, "main", "run").__setitem__(
                "templateRef", {"name": "keybrake-vault-kye", "template": "issue"}
            )
            or _task(d, "main", "run").pop("template")
        ),
        "unknown WorkflowTemplate 'keybrake-vault-kye'",
    ),
    "templateRef-template": (
        lambda d: (
            _task(d, "main", "run").__setitem__(
                "templateRef", {"name": "keybrake-vault-key", "template": "isue"}
            )
            or _task(d, "main", "run").pop("template")
        ),
        "has no template 'isue'",
    ),
    "templateRef-scope": (
        lambda d: (
            _task(d, "main", "issue-vault-key").__setitem__(
                "templateRef",
                {"name": "keybrake-fanout-x", "template": "issue", "clusterScope": True},
            )
            or _task(d, "main", "issue-vault-key").pop("template")
        ),
        "unknown ClusterWorkflowTemplate",
    ),
    "depends": (
        lambda d: _task(d, "main", "run").__setitem__("depends", "issue-vault-kye"),
        "depends on unknown task 'issue-vault-kye'",
    ),
    "depends-result": (
        lambda d: _task(d, "main", "run").__setitem__("depends", "issue-vault-key.Succeded"),
        "unknown task result",
    ),
    "cycle": (
        lambda d: _task(d, "main", "issue-vault-key").__setitem__("depends", "run"),
        "a cycle",
    ),
    "task-output": (
        lambda d: _argument(_task(d, "main", "run"), "vault_key_secret").__setitem__(
            "value", "{{tasks.issue-vault-key.outputs.parameters.vaultkeysecret}}"
        ),
        "which 'issue-vault-key' does not declare",
    ),
    "not-an-ancestor": (
        lambda d: _task(d, "main", "run").pop("depends"),
        "not an ancestor",
    ),
    "input": (
        lambda d: _env(d, "keybrake-issue", "KEYBRAKE_VENDOR").__setitem__(
            "value", "{{inputs.parameters.vendr}}"
        ),
        "not a declared input",
    ),
    "global-output": (
        lambda d: _template(d, "keybrake-revoke")["inputs"]["parameters"][0].__setitem__(
            "default", "{{workflow.outputs.parameters.keybrake_keyid}}"
        ),
        "globalName",
    ),
    "workflow-parameter": (
        lambda d: _argument(_task(d, "main", "run"), "items").__setitem__(
            "value", "{{workflow.parameters.itmes}}"
        ),
        "not a workflow argument",
    ),
    "unknown-variable": (
        lambda d: _env(d, "keybrake-issue", "KEYBRAKE_LABEL").__setitem__(
            "value", "argo/{{workflow.nme}}"
        ),
        "not a workflow variable",
    ),
    "pod-name-outside-pod": (
        lambda d: _argument(_task(d, "main", "run"), "items").__setitem__("value", "{{pod.name}}"),
        "only defined in a pod",
    ),
    "item-outside-loop": (
        lambda d: _argument(_task(d, "main", "run"), "items").__setitem__("value", "{{item}}"),
        "outside withItems",
    ),
    "missing-argument": (
        lambda d: _task(d, "main", "run")["arguments"]["parameters"].pop(),
        "does not pass required input 'items'",
    ),
    "unknown-argument": (
        lambda d: _task(d, "main", "run")["arguments"]["parameters"].append(
            {"name": "budget", "value": "1"}
        ),
        "passes 'budget'",
    ),
    "retry-expression": (
        lambda d: _template(d, "run-pod")["retryStrategy"].__setitem__(
            "expression", "asInt(lastRetry.exitcode) != 77"
        ),
        "lastRetry.exitcode",
    ),
    "expression-tag": (
        lambda d: _env(d, "keybrake-revoke", "KEYBRAKE_KEY_ID").__setitem__(
            "value", "{{=workflow.outputs.parameters['x'] ?? ''}}"
        ),
        "expression tag",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_reference_is_reported(
    breakage: str, documents: dict[str, Document], catalog: list[Document]
) -> None:
    document = documents[FANOUT]
    assert problems(document, Catalog(catalog)) == []
    mutate, expected = BREAKAGES[breakage]
    mutate(document)
    found = problems(document, Catalog(catalog))
    assert any(expected in problem for problem in found), found


def test_depends_expressions_parse() -> None:
    assert parse_depends("a && (b.Succeeded || !c.Failed)") == ["a", "b", "c"]
    assert parse_depends("") == []
    with pytest.raises(ValueError, match="unknown task result"):
        parse_depends("a.Done")
