"""`keybrake wrap`'s output of its awkward fixtures (tests/adopt/wrap_text/: mixed indentation,
flow collections, aliases, CRLF, a CronWorkflow, three vendors sharing a budget) passes Argo's
schema and CRD in strict mode and the semantic checks against the installed keybrake-vault-key
(every argument, `expires_in` included, one its templates take), by templateRef and inlined.
How the text is kept: tests/test_wrap_in_place.py."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from argocheck.schema import all_errors
from argocheck.semantics import Catalog, problems
from ruamel.yaml import YAML

from keybrake.adopt.wrap import WrapOptions, wrap_text

FIXTURES = Path(__file__).resolve().parents[1] / "adopt" / "wrap_text"


def runs(text: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(document, the Workflow its runs are) of each Argo document of a file."""
    found = []
    for document in YAML(typ="safe").load_all(io.StringIO(text)):
        if not str(document.get("apiVersion", "")).startswith("argoproj.io/"):
            continue
        if "generateName" in document["metadata"]:
            document["metadata"]["name"] = document["metadata"].pop("generateName") + "x"
        workflow = document
        if document["kind"] == "CronWorkflow":
            workflow = {
                "apiVersion": document["apiVersion"],
                "kind": "Workflow",
                "metadata": {"name": document["metadata"]["name"] + "-1"},
                "spec": document["spec"]["workflowSpec"],
            }
        found.append((document, workflow))
    return found


@pytest.mark.parametrize("inline", [False, True], ids=["templateRef", "inline"])
@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.name)
def test_wrapped_fixtures_pass_argo_checks(
    path: Path, inline: bool, catalog: list[dict[str, Any]]
) -> None:
    options = WrapOptions(budget_usd=Decimal("50"), max_usd_per_pod=Decimal("5"), inline=inline)
    wrapped = wrap_text(path.read_bytes().decode(), options)
    assert wrapped.changed
    for document, workflow in runs(wrapped.text):
        assert all_errors(document) == [], path.name
        assert problems(workflow, Catalog([] if inline else catalog)) == [], path.name
