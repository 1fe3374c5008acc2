"""Every rendered document is one Argo v4.1.2 accepts, by its JSON schema in strict mode and by
its CRD's openAPIV3Schema; and broken documents are refused, so the validators have teeth."""

from __future__ import annotations

from typing import Any

import pytest
from argocheck import schema
from hera_fixtures import upstream_examples

from keybrake.hera_workflows.render import RenderedFile, rendered_files

FANOUT = "workflowtemplates/keybrake-fanout.yaml"


@pytest.mark.parametrize("rendered_file", rendered_files(), ids=lambda f: f.path)
def test_rendered_documents_validate_strictly(rendered_file: RenderedFile) -> None:
    assert schema.schema_errors(rendered_file.document) == []
    assert schema.crd_errors(rendered_file.document) == []


@pytest.mark.parametrize(("name", "document"), upstream_examples(), ids=lambda v: str(v)[:40])
def test_strict_validators_accept_argos_own_examples(name: str, document: dict[str, Any]) -> None:
    """Strictness adds no false alarms: Argo's upstream examples all pass."""
    assert schema.all_errors(document) == [], name


def _template(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in document["spec"]["templates"] if t["name"] == name)


def test_a_typo_is_caught_only_in_strict_mode(documents: dict[str, dict[str, Any]]) -> None:
    document = documents[FANOUT]
    pod = _template(document, "run-pod")
    pod["retryStategy"] = pod.pop("retryStrategy")
    lax = schema.schema_errors(document, strict=False)
    assert not any("retryStategy" in e for e in lax)  # the schema as published misses it
    assert any("retryStategy" in e for e in schema.schema_errors(document))
    assert any("retryStategy" in e for e in schema.crd_errors(document))


def test_a_bad_retry_policy_is_caught_by_the_crd_enum(documents: dict[str, dict[str, Any]]) -> None:
    document = documents[FANOUT]
    _template(document, "run-pod")["retryStrategy"]["retryPolicy"] = "OnErrors"
    assert schema.schema_errors(document) == []  # schema.json has no enum here
    errors = schema.crd_errors(document)
    assert any("retryPolicy" in e and "OnErrors" in e for e in errors), errors


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: _template(d, "run").__setitem__("parallelism", "ten"), "parallelism"),
        (lambda d: _template(d, "run-pod")["retryStrategy"].__setitem__("limit", [3]), "limit"),
        (lambda d: d["spec"].__setitem__("templates", {"main": {}}), "templates"),
        (lambda d: _template(d, "keybrake-issue")["script"].__setitem__("env", "A=b"), "env"),
        (lambda d: d["spec"]["arguments"]["parameters"][0].__setitem__("value", 3), "value"),
    ],
    ids=["parallelism-string", "limit-list", "templates-map", "env-string", "value-int"],
)
def test_a_wrong_type_is_caught(
    documents: dict[str, dict[str, Any]], mutate: Any, field: str
) -> None:
    document = documents[FANOUT]
    mutate(document)
    assert any(field in e for e in schema.schema_errors(document))
    assert any(field in e for e in schema.crd_errors(document))


def test_int_or_string_fields_take_integers_and_strings(documents: dict[str, Any]) -> None:
    document = documents[FANOUT]
    retry = _template(document, "run-pod")["retryStrategy"]
    for limit in (3, "3"):
        retry["limit"] = limit
        assert schema.all_errors(document) == []


def test_an_unknown_kind_or_api_version_is_refused(documents: dict[str, Any]) -> None:
    document = documents[FANOUT]
    assert schema.all_errors({**document, "kind": "CronWorkflowTemplate"})
    assert any("apiVersion" in e for e in schema.all_errors({**document, "apiVersion": "v1"}))
