"""Argo v4.1.2's JSON schema and CRD openAPIV3Schema as strict validators.

Strict means: every object definition that lists `properties` forbids other keys (the schemas as
published accept any typo), and IntOrString fields accept integers (schema.json types them as
strings only, though Argo accepts `limit: 3`). The CRD adds what schema.json lacks: enums such as
retryPolicy. The data comes from tests/argo (see PROVENANCE.md there).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DATA = Path(__file__).resolve().parents[2] / "argo"
CACHE = DATA.parents[1] / "build" / "argocheck"  # parsed CRDs (see _parsed_crd)
_V1 = "io.argoproj.workflow.v1alpha1"
KINDS = ("Workflow", "WorkflowTemplate", "ClusterWorkflowTemplate", "CronWorkflow")
_CRD_FILES = {
    "Workflow": "crd-workflows.yaml.gz",
    "CronWorkflow": "crd-cronworkflows.yaml.gz",
    "WorkflowTemplate": "crd-workflowtemplates.yaml.gz",
    "ClusterWorkflowTemplate": "crd-clusterworkflowtemplates.yaml.gz",
}


def read_data(name: str) -> bytes:
    """A file of tests/argo, decompressed when stored as .gz."""
    path = DATA / name
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def forbid_unknown_fields(node: Any) -> None:
    """Add `additionalProperties: false` to every object schema with `properties` (in place)."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            forbid_unknown_fields(value)
    elif isinstance(node, list):
        for value in node:
            forbid_unknown_fields(value)


@cache
def _schema_definitions(strict: bool) -> dict[str, Any]:
    schema = json.loads(read_data("schema.json.gz"))
    definitions = copy.deepcopy(schema["definitions"])
    if strict:
        forbid_unknown_fields(definitions)
        definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {
            "type": ["string", "integer"]
        }
    return definitions


@cache
def schema_validator(kind: str, strict: bool = True) -> jsonschema.Draft202012Validator:
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": f"#/definitions/{_V1}.{kind}",
        "definitions": _schema_definitions(strict),
    }
    return jsonschema.Draft202012Validator(root)


def _parsed_crd(name: str) -> dict[str, Any]:
    """The CRD file `name` of tests/argo, parsed. Parsing its YAML (nearly 3 MB) takes about half a
    second; the result is kept as JSON, which loads fifty times faster, under build/ (git-ignored)
    named by the file's SHA-256, so a changed file is parsed afresh. Written atomically: test
    workers may race to write it, and any of them may read it."""
    raw = read_data(name)
    cached = CACHE / f"{name.split('.')[0]}-{hashlib.sha256(raw).hexdigest()[:16]}.json"
    try:
        return dict(json.loads(cached.read_bytes()))
    except (OSError, ValueError):
        pass
    crd: dict[str, Any] = yaml.load(raw, Loader=yaml.CSafeLoader)
    text = json.dumps(crd)
    if json.loads(text) != crd:  # not plain JSON data (never so for a CRD): not cached
        return crd
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=CACHE, delete=False, suffix=".tmp") as out:
            out.write(text)
        os.chmod(out.name, 0o644)
        os.replace(out.name, cached)
    except OSError:  # a read-only checkout: parse every time
        pass
    return crd


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    crd = _parsed_crd(_CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


@cache
def crd_validator(kind: str, strict: bool = True) -> jsonschema.Draft7Validator:
    schema = copy.deepcopy(crd_schema(kind))
    if strict:
        forbid_unknown_fields(schema)
    return jsonschema.Draft7Validator(schema)


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(document)"
    return f"{where}: {error.message}"


def schema_errors(document: dict[str, Any], strict: bool = True) -> list[str]:
    kind = document.get("kind")
    if kind not in KINDS:
        return [f"kind: {kind!r} is not one of {', '.join(KINDS)}"]
    validator = schema_validator(kind, strict)
    return sorted(_describe(e) for e in validator.iter_errors(document))


def crd_errors(document: dict[str, Any], strict: bool = True) -> list[str]:
    kind = document.get("kind")
    if kind not in KINDS:
        return [f"kind: {kind!r} is not one of {', '.join(KINDS)}"]
    validator = crd_validator(kind, strict)
    return sorted(_describe(e) for e in validator.iter_errors(document))


def all_errors(document: dict[str, Any]) -> list[str]:
    """Strict schema.json and strict CRD errors, labelled by source."""
    return [f"schema.json: {e}" for e in schema_errors(document)] + [
        f"CRD: {e}" for e in crd_errors(document)
    ]
