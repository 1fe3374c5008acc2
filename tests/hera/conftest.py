"""Fixtures of the Hera template tests: the rendered documents and Argo's upstream examples."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from argocheck.schema import DATA

from keybrake.hera_workflows.render import RenderedFile, rendered_files
from tests.fakes.kubernetes import FakeCluster

REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="session")
def rendered() -> list[RenderedFile]:
    return rendered_files()


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
