"""The service accounts and roles shipped for workflow namespaces (templates/rbac/): they validate
strictly against the Kubernetes schemas, grant no more than the keybrake steps need, and are the
accounts the rendered templates run as."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from keybrake.hera_workflows.render import rendered_files

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "templates" / "rbac"
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((RBAC / name).read_text()) if d]


def by_kind(name: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in documents(name) if d["kind"] == kind]


ALL = [(f.name, i, d) for f in sorted(RBAC.glob("*.yaml")) for i, d in enumerate(documents(f.name))]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("item", ALL, ids=lambda item: f"{item[0]}#{item[1]}")
def test_every_rbac_document_validates_strictly(
    item: tuple[str, int, dict[str, Any]], version: str
) -> None:
    kubernetes_validate.validate(item[2], version, strict=True)


def rules(name: str) -> list[dict[str, Any]]:
    [role] = by_kind(name, "Role")
    return list(role["rules"])


def test_the_issuer_may_create_secrets_and_nothing_more_on_them() -> None:
    granted = {
        (group, resource): sorted(rule["verbs"])
        for rule in rules("keybrake-issuer.yaml")
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted == {
        ("", "secrets"): ["create"],  # no get, list, watch, update, patch or delete
        ("argoproj.io", "workflowtaskresults"): ["create", "patch"],  # Argo's executor
    }


def test_the_workload_account_gets_no_secrets_at_all() -> None:
    granted = {
        (g, r)
        for rule in rules("keybrake-workload.yaml")
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert granted == {("argoproj.io", "workflowtaskresults")}


@pytest.mark.parametrize("name", ["keybrake-issuer", "keybrake-workload"])
def test_each_role_is_bound_to_its_own_service_account(name: str) -> None:
    [account] = by_kind(f"{name}.yaml", "ServiceAccount")
    [binding] = by_kind(f"{name}.yaml", "RoleBinding")
    assert account["metadata"]["name"] == name
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": name,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name}]
    for document in documents(f"{name}.yaml"):
        assert "namespace" not in document["metadata"]  # applied in each workflow namespace


def test_the_proxys_bindings_are_the_built_in_roles_it_needs() -> None:
    roles = {
        b["roleRef"]["name"] for b in by_kind("proxy-kubernetes-login.yaml", "ClusterRoleBinding")
    }
    assert roles == {"system:service-account-issuer-discovery", "system:auth-delegator"}
    for binding in by_kind("proxy-kubernetes-login.yaml", "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "keybrake", "namespace": "keybrake"}
        ]


def test_the_rendered_templates_run_as_these_accounts() -> None:
    rendered = {f.path: f.document for f in rendered_files()}
    library = rendered["workflowtemplates/keybrake-vault-key.yaml"]
    for template in library["spec"]["templates"]:
        defaults = {p["name"]: p.get("default") for p in template["inputs"]["parameters"]}
        assert template["serviceAccountName"] == "{{inputs.parameters.service_account}}"
        assert defaults["service_account"] == "keybrake-issuer", template["name"]
    fanout = rendered["workflowtemplates/keybrake-fanout.yaml"]
    arguments = {p["name"]: p.get("value") for p in fanout["spec"]["arguments"]["parameters"]}
    assert arguments["workload_service_account"] == "keybrake-workload"
    [pod] = [t for t in fanout["spec"]["templates"] if t["name"] == "run-pod"]
    assert pod["serviceAccountName"] == "{{workflow.parameters.workload_service_account}}"
    assert "volumes" not in pod  # no keybrake token for the workload
