"""Fixtures of the Hera template tests: the rendered documents, Argo's upstream examples, and a
stand-in cluster holding the shipped RBAC. A module of its own (not conftest.py) so that the
end-to-end runs under tests/e2e/hera/ use the very same fixtures: both conftests import them."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import yaml
from argocheck.schema import DATA

from keybrake.hera_workflows.render import RenderedFile, rendered_files
from tests.fakes.kubernetes import FakeCluster

HERA = Path(__file__).resolve().parent
REPO = HERA.parents[1]
RBAC = REPO / "templates" / "rbac"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FakeCluster]:
    """A stand-in API server for the runs: the workflow namespace `argo` holding the shipped
    RBAC (templates/rbac/): what those Roles grant on Secrets, and nothing else."""
    fake = FakeCluster(tmp_path / "cluster")
    for name in ("keybrake-issuer", "keybrake-workload"):
        for document in yaml.safe_load_all((RBAC / f"{name}.yaml").read_text()):
            if document and document["kind"] == "Role":
                for rule in document["rules"]:
                    if "secrets" in rule["resources"]:
                        fake.allow("argo", name, *rule["verbs"])
    yield fake
    fake.stop()


class RenderedOnce(RenderedFile):
    """A rendered file whose YAML is dumped once: `RenderedFile.text` dumps the document again at
    every access (a twentieth of a second a file), and the session's tests read it many times."""

    @cached_property
    def text(self) -> str:  # type: ignore[override]
        return super().text


@pytest.fixture(scope="session")
def rendered() -> list[RenderedFile]:
    """What the Python renders, once a session (documents never to be changed: `documents` and
    `catalog` hand out copies)."""
    return [RenderedOnce(f.path, f.origin, f.document) for f in rendered_files()]


@pytest.fixture(scope="session")
def catalog(rendered: list[RenderedFile]) -> list[dict[str, Any]]:
    """Every rendered document, as `argo` would find them installed (templateRef targets)."""
    return [copy.deepcopy(f.document) for f in rendered]


@pytest.fixture
def documents(rendered: list[RenderedFile]) -> dict[str, dict[str, Any]]:
    """Rendered documents by path in templates/; a fresh copy per test, free to break."""
    return {f.path: copy.deepcopy(f.document) for f in rendered}


def upstream_examples() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((DATA / "examples").glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if document:
                found.append((f"{path.name}#{index}", document))
    return found
