"""Offline checks of the proxy's deployment: the Dockerfile and the kustomize base templates/proxy.

No Docker engine and no cluster are available, so:
- every manifest is validated against the Kubernetes OpenAPI schemas bundled with the
  `kubernetes-validate` package, in strict mode (unknown fields are errors), and negative tests
  prove that this validation really rejects a typo'd field and a wrong type;
- the cross-object wiring a schema cannot see (selectors, ports, Secret names and keys, settings
  names, the image's user and command) is checked by hand;
- the Dockerfile is parsed and checked statically.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from tests.release import pyproject_version

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "templates" / "proxy"
KUSTOMIZATION = BASE / "kustomization.yaml"
SECRETS_EXAMPLE = BASE / "secrets.example.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

NAMESPACE = "keybrake"
IMAGE = f"ghcr.io/keybrake/keybrake:{pyproject_version()}"  # the release's (tests/release.py)
PORT = 8080
SERVICE_URL = "http://keybrake.keybrake.svc.cluster.local:8080"
SERVE_ARGS = ["serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "2"]
WORKFLOW_NAMESPACE_LABEL = {"keybrake.dev/workflows": "true"}

# env var -> (Secret name, key, optional)
EXPECTED_SECRET_ENV = {
    "KEYBRAKE_DATABASE_URL": ("keybrake-database", "url", False),
    "KEYBRAKE_API_KEY": ("keybrake-credentials", "api_key", False),
    "KEYBRAKE_STRIPE_SECRET_KEY": (
        "keybrake-vendor-secrets",
        "KEYBRAKE_STRIPE_SECRET_KEY",
        True,
    ),
    "KEYBRAKE_TWILIO_ACCOUNT_SID": (
        "keybrake-vendor-secrets",
        "KEYBRAKE_TWILIO_ACCOUNT_SID",
        True,
    ),
    "KEYBRAKE_TWILIO_AUTH_TOKEN": (
        "keybrake-vendor-secrets",
        "KEYBRAKE_TWILIO_AUTH_TOKEN",
        True,
    ),
    "KEYBRAKE_RESEND_API_KEY": ("keybrake-vendor-secrets", "KEYBRAKE_RESEND_API_KEY", True),
}


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# The schemas shipped in the installed package: its newest Kubernetes version, and an older
# floor so the manifests do not silently depend on fields only the newest clusters know.
BUNDLED_VERSIONS = sorted(set(all_versions()), key=_version_key)
LATEST_K8S = BUNDLED_VERSIONS[-1]
OLDEST_SUPPORTED_K8S = "1.30.0"
K8S_VERSIONS = [OLDEST_SUPPORTED_K8S, LATEST_K8S]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@functools.cache
def _parsed(path: Path) -> tuple[Any, ...]:
    """A file's documents, parsed once a session (PyYAML's pure-Python loader took most of this
    module's time, the same files read again for every object a test looked up)."""
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    docs = copy.deepcopy(list(_parsed(path)))  # each caller its own, free to change them
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}


def _kustomization() -> dict[str, Any]:
    docs = _load_yaml_docs(KUSTOMIZATION)
    assert len(docs) == 1
    return docs[0]


def _base_manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every document of every resource the kustomization lists."""
    out = []
    for name in _kustomization()["resources"]:
        for doc in _load_yaml_docs(BASE / name):
            out.append((name, doc))
    return out


def _one(kind: str, component: str = "proxy") -> dict[str, Any]:
    """The base's object of `kind` for `component` (the proxy, or the reaper)."""
    found = [
        doc
        for _, doc in _base_manifests()
        if doc["kind"] == kind
        and doc["metadata"].get("labels", {}).get("app.kubernetes.io/component", "proxy")
        in (component, "namespace")
    ]
    assert len(found) == 1, f"expected exactly one {kind} of {component}, found {len(found)}"
    return found[0]


def _deployment() -> dict[str, Any]:
    return _one("Deployment")


def _pod_spec() -> dict[str, Any]:
    return _deployment()["spec"]["template"]["spec"]


def _pod_labels() -> dict[str, str]:
    return _deployment()["spec"]["template"]["metadata"]["labels"]


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def _validate(doc: dict[str, Any], version: str) -> None:
    """Strict schema validation; an unknown kind is an error here, not a warning."""
    kubernetes_validate.validate(doc, version, strict=True)


def _selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def _id(item: tuple[str, dict[str, Any]]) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


# --------------------------------------------------------------------------------------------
# kustomization
# --------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = _kustomization()
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for name in resources:
        assert "/" not in name and not name.startswith(".."), f"{name}: not a local file"
        assert (BASE / name).is_file(), f"{name} is listed but does not exist"
    on_disk = {
        p.name
        for p in BASE.iterdir()
        if p.suffix in {".yaml", ".yml"}
        and p.name != KUSTOMIZATION.name
        and not p.name.endswith((".example.yaml", ".example.yml"))
    }
    assert set(resources) == on_disk, (
        f"not listed: {sorted(on_disk - set(resources))}; "
        f"listed but missing: {sorted(set(resources) - on_disk)}"
    )
    assert SECRETS_EXAMPLE.name not in resources, "the Secret example must never be applied"


def test_kustomization_namespace_and_overridable_image() -> None:
    kustomization = _kustomization()
    assert kustomization["namespace"] == NAMESPACE
    repository, tag = IMAGE.rsplit(":", 1)
    assert kustomization["images"] == [{"name": repository, "newTag": tag}]
    assert _container()["image"] == IMAGE
    for name, doc in _base_manifests():
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        elif doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], f"{name}: {doc['kind']} has no namespace"
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: wrong namespace"


def test_base_holds_exactly_the_expected_objects_and_no_secret() -> None:
    kinds = sorted(doc["kind"] for _, doc in _base_manifests())
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
            # the reaper
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
        ]
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not on PATH")
def test_kustomize_build_renders_the_files_as_written() -> None:
    """`kubectl kustomize` (offline, built-in kustomize) renders the base without error, and its
    namespace/image transformers change nothing: the files checked here are what gets applied."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(BASE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def canon(docs: list[dict[str, Any]]) -> list[str]:
        return sorted(json.dumps(doc, sort_keys=True) for doc in docs)

    assert canon(rendered) == canon([doc for _, doc in _base_manifests()])


# --------------------------------------------------------------------------------------------
# Schema validation (kubernetes-validate, strict)
# --------------------------------------------------------------------------------------------


def test_bundled_schema_versions_are_the_ones_we_validate_against() -> None:
    assert _version_key(LATEST_K8S) >= _version_key("1.30.0")
    assert OLDEST_SUPPORTED_K8S in BUNDLED_VERSIONS
    assert LATEST_K8S == kubernetes_validate.latest_version()


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", _base_manifests(), ids=_id)
def test_manifest_validates_strictly(item: tuple[str, dict[str, Any]], version: str) -> None:
    _, doc = item
    _validate(doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_secret_example_validates_strictly(version: str) -> None:
    for doc in _load_yaml_docs(SECRETS_EXAMPLE):
        _validate(doc, version)


def test_validator_rejects_a_typo_d_field() -> None:
    doc = copy.deepcopy(_deployment())
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        _validate(doc, LATEST_K8S)


def test_validator_rejects_an_unknown_field_in_metadata_and_nested_objects() -> None:
    doc = copy.deepcopy(_one("Service"))
    doc["metadata"]["label"] = {"a": "b"}
    with pytest.raises(kubernetes_validate.ValidationError, match="label"):
        _validate(doc, LATEST_K8S)
    doc = copy.deepcopy(_one("NetworkPolicy"))
    doc["spec"]["ingress"][0]["from"][0]["namespaceSelecter"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="namespaceSelecter"):
        _validate(doc, LATEST_K8S)


@pytest.mark.parametrize(
    ("path", "bad_value"),
    [
        (("spec", "replicas"), "two"),
        (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "8080"),
        (("spec", "template", "spec", "terminationGracePeriodSeconds"), "90s"),
        (("spec", "template", "spec", "containers", 0, "args"), "serve --port 8080"),
    ],
    ids=["replicas", "containerPort", "gracePeriod", "args"],
)
def test_validator_rejects_a_wrong_type(path: tuple[str | int, ...], bad_value: Any) -> None:
    doc = copy.deepcopy(_deployment())
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = bad_value
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(doc, LATEST_K8S)


def test_validator_rejects_an_unknown_kind() -> None:
    doc = copy.deepcopy(_deployment())
    doc["kind"] = "Deploymnet"
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        _validate(doc, LATEST_K8S)


# --------------------------------------------------------------------------------------------
# Deployment
# --------------------------------------------------------------------------------------------


def _quantity(value: str | int) -> Decimal:
    text = str(value)
    suffixes = {
        "m": Decimal("0.001"),
        "Ki": Decimal(1024),
        "Mi": Decimal(1024**2),
        "Gi": Decimal(1024**3),
        "k": Decimal(1000),
        "M": Decimal(1000**2),
        "G": Decimal(1000**3),
    }
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * suffixes[suffix]
    return Decimal(text)


def test_deployment_is_replicated_and_rolls_without_losing_capacity() -> None:
    spec = _deployment()["spec"]
    assert spec["replicas"] >= 2
    assert _selects(spec["selector"]["matchLabels"], _pod_labels())
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_pods_spread_across_nodes() -> None:
    pod = _pod_spec()
    by_node = [
        c
        for c in pod.get("topologySpreadConstraints", [])
        if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    anti = (
        pod.get("affinity", {})
        .get("podAntiAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", [])
    )
    anti_by_node = [t for t in anti if t["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node or anti_by_node, "no spread of replicas across nodes"
    for constraint in by_node:
        assert constraint["maxSkew"] == 1
        assert constraint["whenUnsatisfiable"] == "DoNotSchedule"
        assert _selects(constraint["labelSelector"]["matchLabels"], _pod_labels())
    for term in anti_by_node:
        assert _selects(term["labelSelector"]["matchLabels"], _pod_labels())


def test_container_runs_the_proxy_with_two_workers() -> None:
    container = _container()
    assert container["image"] == IMAGE
    assert "command" not in container, "keep the image's ENTRYPOINT (keybrake)"
    assert container["args"] == SERVE_ARGS
    assert container["ports"] == [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]


def test_pod_and_container_are_locked_down() -> None:
    pod = _pod_spec()
    container = _container()
    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert isinstance(pod_sc["runAsUser"], int) and pod_sc["runAsUser"] > 0
    assert isinstance(pod_sc["runAsGroup"], int) and pod_sc["runAsGroup"] > 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert "runAsUser" not in sc or sc["runAsUser"] > 0
    # The only writable path is an emptyDir on /tmp.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "/tmp" in mounts
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for name in mounts.values():
        assert set(volumes[name]) - {"name"} == {"emptyDir"}, f"volume {name} is not an emptyDir"
    assert pod.get("hostNetwork", False) is False
    assert pod.get("hostPID", False) is False
    assert pod.get("hostIPC", False) is False


def test_service_account_has_no_token() -> None:
    account = _one("ServiceAccount")
    pod = _pod_spec()
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False


def test_service_links_do_not_pollute_the_keybrake_settings_prefix() -> None:
    # A Service named `keybrake` would otherwise inject KEYBRAKE_PORT=tcp://...,
    # KEYBRAKE_SERVICE_HOST and friends into the proxy's environment.
    assert _pod_spec()["enableServiceLinks"] is False


def test_resources_have_requests_and_limits() -> None:
    resources = _container()["resources"]
    for resource in ("cpu", "memory"):
        request = _quantity(resources["requests"][resource])
        limit = _quantity(resources["limits"][resource])
        assert 0 < request <= limit, resource
    # Two uvicorn workers of a Python service: leave headroom above the request.
    assert _quantity(resources["limits"]["memory"]) >= 256 * 1024**2


def _container_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert port in by_name, f"port name {port!r} is not a container port"
    return by_name[port]


def test_probes_hit_the_health_endpoints_on_the_container_port() -> None:
    container = _container()
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    probes = [readiness, liveness]
    if "startupProbe" in container:
        # Must not depend on the database, or an outage at start would restart pods in a loop.
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        probes.append(container["startupProbe"]["httpGet"])
    for probe in probes:
        assert _container_port(probe["port"]) == PORT
        assert probe.get("scheme", "HTTP") == "HTTP"
    # Liveness is slower to give up than readiness: a database blip takes pods out of the
    # Service, it never restarts them.
    live = container["livenessProbe"]
    ready = container["readinessProbe"]
    assert (
        live["periodSeconds"] * live["failureThreshold"]
        > ready["periodSeconds"] * ready["failureThreshold"]
    )


def _upstream_timeout_seconds() -> float:
    for env in _container()["env"]:
        if env["name"] == "KEYBRAKE_UPSTREAM_TIMEOUT" and "value" in env:
            return float(env["value"])
    from keybrake.proxy.settings import Settings

    return float(Settings.model_fields["upstream_timeout"].default)


def test_grace_period_lets_in_flight_calls_finish() -> None:
    pod = _pod_spec()
    pre_stop = _container()["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        pre_stop_seconds = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        pre_stop_seconds = int(command[1])
    grace = pod["terminationGracePeriodSeconds"]
    # After the preStop sleep, SIGTERM: the slowest in-flight vendor call must still finish.
    assert grace >= pre_stop_seconds + _upstream_timeout_seconds() + 10


# --------------------------------------------------------------------------------------------
# Secrets and environment
# --------------------------------------------------------------------------------------------


def _secret_refs(pod: dict[str, Any]) -> Iterator[tuple[str, str, str, bool]]:
    """(env name, Secret name, key, optional) for every secretKeyRef in the pod."""
    for container in pod.get("initContainers", []) + pod["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                yield env["name"], ref["name"], ref["key"], bool(ref.get("optional", False))


def test_env_comes_from_the_expected_secrets_and_keys() -> None:
    refs = {env: (name, key, optional) for env, name, key, optional in _secret_refs(_pod_spec())}
    assert refs == EXPECTED_SECRET_ENV
    container = _container()
    assert "envFrom" not in container, "every secret is named explicitly, key by key"
    # Secret volumes would be another way in: none.
    assert not any("secret" in v for v in _pod_spec()["volumes"])


def test_every_referenced_secret_is_described_in_the_proxy_namespace() -> None:
    """The example Secrets (what operators create) are in the Deployment's own namespace and carry
    exactly the keys the Deployment reads; secretKeyRef cannot cross namespaces, so this is where
    the vendor secrets live and nowhere else."""
    deployment_ns = _deployment()["metadata"]["namespace"]
    secrets = {}
    for doc in _load_yaml_docs(SECRETS_EXAMPLE):
        assert doc["kind"] == "Secret"
        assert doc["metadata"]["namespace"] == deployment_ns
        secrets[doc["metadata"]["name"]] = set(doc.get("stringData", {})) | set(doc.get("data", {}))
    wanted: dict[str, set[str]] = {}
    for component in ("proxy", "reaper"):
        pod = _one("Deployment", component)["spec"]["template"]["spec"]
        for _, name, key, _ in _secret_refs(pod):
            wanted.setdefault(name, set()).add(key)
    assert secrets == wanted


def test_secret_example_holds_placeholders_only() -> None:
    for doc in _load_yaml_docs(SECRETS_EXAMPLE):
        for key, value in doc.get("stringData", {}).items():
            assert "CHANGE-ME" in value, f"{key}: not a placeholder"
            assert not _looks_like_a_secret(value), f"{key}: looks like a real secret"
        assert "data" not in doc
    url = next(
        doc["stringData"]["url"]
        for doc in _load_yaml_docs(SECRETS_EXAMPLE)
        if doc["metadata"]["name"] == "keybrake-database"
    )
    assert url.startswith("postgresql://")


def test_every_keybrake_env_var_is_a_real_setting() -> None:
    """A typo in an env var name passes every schema; catch it against the settings model."""
    from keybrake.proxy.settings import Settings

    known = {f"KEYBRAKE_{name.upper()}" for name in Settings.model_fields}
    names = [env["name"] for env in _container()["env"]]
    assert len(names) == len(set(names)), "an env var is set twice"
    unknown = [n for n in names if n.startswith("KEYBRAKE_") and n not in known]
    assert not unknown, f"not settings of the proxy: {unknown}"


_SECRET_NAME = re.compile(
    r"(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|SID|DATABASE_URL|DSN)(_|$)"
)
# Stripe (sk_/rk_/whsec_), Resend (re_), Twilio (AC.../SK...), a URL with a password, a PEM key.
# A URL whose password is a documented placeholder (CHANGE-ME, PASSWORD) is not a secret.
_SECRET_VALUE = re.compile(
    r"(sk_(live|test)_|rk_(live|test)_|whsec_|\bre_[A-Za-z0-9]{8,}|\bAC[0-9a-f]{32}\b"
    r"|\bSK[0-9a-f]{32}\b|://[^/\s:@]+:(?!(CHANGE-ME|PASSWORD)@)[^/\s@]+@|-----BEGIN)"
)


def _looks_like_a_secret(value: str) -> bool:
    return bool(_SECRET_VALUE.search(value))


def _secret_like_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name.upper().removeprefix("KEYBRAKE_")))


def _secret_literals(container: dict[str, Any]) -> list[str]:
    """Env entries that put a secret into the manifest as a literal value."""
    bad = []
    for env in container.get("env", []):
        if "value" not in env:
            continue
        if _secret_like_name(env["name"]) or _looks_like_a_secret(str(env["value"])):
            bad.append(env["name"])
    return bad


def test_no_secret_value_literal_in_any_env_var() -> None:
    for _, doc in _base_manifests():
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert _secret_literals(container) == []


def test_secret_literal_check_catches_what_it_must() -> None:
    container = {
        "env": [
            {"name": "KEYBRAKE_STRIPE_SECRET_KEY", "value": "whatever"},
            {"name": "KEYBRAKE_SOMETHING", "value": "postgresql://u:hunter2@db:5432/k"},
            {"name": "KEYBRAKE_OTHER", "value": "sk_live_0123456789abcdef"},
            {"name": "KEYBRAKE_DB_PASSWORD", "value": "hunter2"},
            {"name": "KEYBRAKE_MAX_TTL", "value": "7d"},
            {"name": "KEYBRAKE_STRIPE_API_BASE", "value": "https://api.stripe.com"},
            {"name": "KEYBRAKE_DATABASE_URL", "value": "postgresql://db/k"},
            {"name": "KEYBRAKE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}},
        ]
    }
    assert _secret_literals(container) == [
        "KEYBRAKE_STRIPE_SECRET_KEY",
        "KEYBRAKE_SOMETHING",
        "KEYBRAKE_OTHER",
        "KEYBRAKE_DB_PASSWORD",
        "KEYBRAKE_DATABASE_URL",
    ]
    assert _looks_like_a_secret("postgresql://keybrake:CHANGE-ME@db:5432/k") is False
    assert _looks_like_a_secret("postgresql://keybrake:s3cr3t@db:5432/k") is True


def test_no_secret_in_any_base_file() -> None:
    for name in _kustomization()["resources"]:
        text = (BASE / name).read_text()
        assert not _looks_like_a_secret(text), f"{name} contains something like a secret"


# --------------------------------------------------------------------------------------------
# Service, PodDisruptionBudget, NetworkPolicy
# --------------------------------------------------------------------------------------------


def test_service_selects_the_proxy_pods_on_the_container_port() -> None:
    service = _one("Service")
    spec = service["spec"]
    assert spec["selector"] == _deployment()["spec"]["selector"]["matchLabels"]
    assert _selects(spec["selector"], _pod_labels())
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    assert len(spec["ports"]) == 1
    port = spec["ports"][0]
    assert port["port"] == PORT
    assert _container_port(port["targetPort"]) == PORT
    url = (
        f"http://{service['metadata']['name']}.{service['metadata']['namespace']}"
        f".svc.cluster.local:{port['port']}"
    )
    assert url == SERVICE_URL


def test_pdb_keeps_a_replica_and_selects_the_proxy_pods() -> None:
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["minAvailable"] < _deployment()["spec"]["replicas"], "a drain could never proceed"
    assert pdb["selector"]["matchLabels"] == _deployment()["spec"]["selector"]["matchLabels"]
    assert _selects(pdb["selector"]["matchLabels"], _pod_labels())


def _ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def test_network_policy_admits_only_workflow_namespaces_and_the_reaper_on_8080() -> None:
    policy = _one("NetworkPolicy")["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], _pod_labels())
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["ingress"], "an empty ingress list would deny everything"
    reaper = _one("Deployment", "reaper")["spec"]["template"]["metadata"]["labels"]
    for rule in policy["ingress"]:
        assert _ports(rule) == {("TCP", PORT)}
        [workflows, own] = rule["from"]
        assert workflows == {"namespaceSelector": {"matchLabels": WORKFLOW_NAMESPACE_LABEL}}
        # A bare podSelector: pods of the proxy's own namespace, and only the reaper's.
        assert set(own) == {"podSelector"} and _selects(own["podSelector"]["matchLabels"], reaper)
        assert not _selects(own["podSelector"]["matchLabels"], _pod_labels())


def test_network_policy_egress_is_dns_vendors_and_postgres_only() -> None:
    egress = _one("NetworkPolicy")["spec"]["egress"]
    allowed: set[tuple[str, int]] = set()
    for rule in egress:
        assert rule.get("ports"), "an egress rule without ports allows every port"
        allowed |= _ports(rule)
    assert allowed == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 5432)}
    dns = [r for r in egress if ("UDP", 53) in _ports(r)]
    assert len(dns) == 1 and dns[0]["to"], "DNS goes to the cluster DNS only"
    https = [r for r in egress if ("TCP", 443) in _ports(r)]
    assert len(https) == 1
    for peer in https[0]["to"]:
        # Public addresses only: no in-cluster HTTPS, no cloud metadata endpoint.
        if peer["ipBlock"]["cidr"] == "0.0.0.0/0":
            assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(
                peer["ipBlock"]["except"]
            )


# --------------------------------------------------------------------------------------------
# Dockerfile (static: no Docker engine here)
# --------------------------------------------------------------------------------------------


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and line continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def _stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """(global ARG defaults, instructions per stage starting with its FROM)."""
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for instruction, args in _dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction == "FROM":
            stages.append([(instruction, args)])
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].append((instruction, args))
    assert stages, "no FROM"
    return global_args, stages


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def _final_stage() -> list[tuple[str, str]]:
    return _stages()[1][-1]


def test_dockerfile_base_image_is_a_pinned_python_3_12_slim() -> None:
    global_args, stages = _stages()
    names = set()
    for stage in stages:
        words = stage[0][1].split()
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], words[0])
        if image in names:  # FROM <earlier stage>
            continue
        assert re.fullmatch(
            r"(docker\.io/(library/)?)?python:3\.12\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?",
            image,
        ), f"base image {image!r} is not a pinned python:3.12.x-slim tag"
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])
    assert len(stages) >= 2, "multi-stage: the runtime stage holds no build leftovers"


def test_dockerfile_runs_as_a_non_root_numeric_user_matching_the_pod() -> None:
    final = _final_stage()
    users = [args for instruction, args in final if instruction == "USER"]
    assert users, "the final stage never switches away from root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) > 0, f"USER {users[-1]!r} must be a non-zero uid"
    assert not group or (group.isdigit() and int(group) > 0)
    # Nothing runs as root after the switch.
    last_user = max(i for i, (instruction, _) in enumerate(final) if instruction == "USER")
    assert not any(instruction == "RUN" for instruction, _ in final[last_user:])
    pod_sc = _pod_spec()["securityContext"]
    assert pod_sc["runAsUser"] == int(user)
    if group:
        assert pod_sc["runAsGroup"] == int(group)


def test_dockerfile_exposes_8080_and_has_a_stdlib_healthcheck() -> None:
    final = _final_stage()
    exposed = [args.split() for instruction, args in final if instruction == "EXPOSE"]
    assert [str(PORT)] in exposed or [f"{PORT}/tcp"] in exposed
    checks = [args for instruction, args in final if instruction == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    assert "--timeout=" in options and "--interval=" in options
    argv = _exec_form(command)
    assert argv[0] in {"python", "python3", "/opt/venv/bin/python"}
    assert argv[1] == "-c"
    assert "urllib.request" in argv[2]
    assert f"http://127.0.0.1:{PORT}/healthz" in argv[2]
    assert "timeout=" in argv[2], "a hung server must fail the check, not hang it"
    assert not re.search(r"\b(curl|wget)\b", checks[0])
    compile(argv[2], "<healthcheck>", "exec")


def test_dockerfile_entrypoint_is_keybrake_serve_and_matches_the_pod_args() -> None:
    final = _final_stage()
    entrypoints = [_exec_form(a) for i, a in final if i == "ENTRYPOINT"]
    cmds = [_exec_form(a) for i, a in final if i == "CMD"]
    assert entrypoints[-1] == ["keybrake"]
    assert cmds[-1] == ["serve", "--host", "0.0.0.0", "--port", str(PORT)]
    # Kubernetes args replace CMD and keep ENTRYPOINT: the pod runs `keybrake serve ... --workers 2`
    # (the same command as the image, plus the worker count).
    assert SERVE_ARGS[: len(cmds[-1])] == cmds[-1]


def test_dockerfile_installs_the_project_with_everything_the_build_needs() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "keybrake" in pyproject["project"]["scripts"]
    _, stages = _stages()
    copied: set[str] = set()
    for stage in stages:
        for instruction, args in stage:
            if instruction == "COPY" and "--from=" not in args:
                *sources, _dest = shlex.split(args)
                copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
            assert instruction != "ADD", "use COPY (ADD fetches URLs and unpacks archives)"
    needed = {pyproject["project"]["readme"], "pyproject.toml"}
    # Without them the build only warns, and the image's package carries no licence text.
    needed |= set(pyproject["project"].get("license-files", []))
    needed |= {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied, f"not copied into the build: {sorted(needed - copied)}"
    for source in copied - {pyproject["project"]["readme"]}:
        assert (ROOT / source).exists(), source
    # The build context is an allow-list (.dockerignore): what is copied must be let in.
    allowed = {
        line[1:].strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed, f"copied but left out of the context: {sorted(copied - allowed)}"
    runs = " ".join(args for stage in stages for instruction, args in stage if instruction == "RUN")
    assert re.search(r"pip install (--no-cache-dir )?\.(\s|$)", runs), "pip install . not found"


def test_dockerfile_has_no_secret() -> None:
    global_args, stages = _stages()
    text = DOCKERFILE.read_text()
    assert not _looks_like_a_secret(text)
    declared = dict(global_args)
    for stage in stages:
        for instruction, args in stage:
            if instruction == "ARG":
                name, _, default = args.partition("=")
                declared[name] = default
            elif instruction == "ENV":
                for pair in shlex.split(args):
                    name, _, value = pair.partition("=")
                    declared[name] = value
            elif instruction == "COPY":
                assert ".env" not in args
    for name in declared:
        assert not _secret_like_name(name), f"{name}: secrets come at run time"
        assert not name.startswith("KEYBRAKE_"), f"{name}: settings come at run time"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i : end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        if any(regex(body).fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_the_package_sources() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for kept in [
        "pyproject.toml",
        "README.md",
        "cli/main.py",
        "proxy/settings.py",
        "proxy/pricing.toml",
        "hera_workflows/__init__.py",
    ]:
        assert not _ignored(kept, patterns), f"{kept} would be missing from the build context"
    for package_dir in ("cli", "proxy", "hera_workflows"):
        for path in (ROOT / package_dir).rglob("*"):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and "__pycache__" not in rel and not rel.endswith(".pyc"):
                assert not _ignored(rel, patterns), rel
    for dropped in [
        ".git/config",
        ".venv/bin/python",
        ".env",
        "proxy/.env",
        "keybrake.db",
        "proxy/keybrake.db",
        "tests/conftest.py",
        "proxy/__pycache__/settings.cpython-312.pyc",
        "templates/proxy/secrets.example.yaml",
    ]:
        assert _ignored(dropped, patterns), f"{dropped} would be sent to the build context"


# --------------------------------------------------------------------------------------------
# docs/deploy.md
# --------------------------------------------------------------------------------------------


def _doc_yaml_blocks() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), flags=re.DOTALL)
    docs = []
    for block in blocks:
        docs += [d for d in yaml.safe_load_all(block) if isinstance(d, dict) and "kind" in d]
    return docs


def test_deploy_doc_covers_the_steps() -> None:
    text = DEPLOY_DOC.read_text()
    for needle in [
        "kubectl apply -k templates/proxy",
        "kubectl -n keybrake create secret generic keybrake-database",
        "kubectl -n keybrake create secret generic keybrake-credentials",
        "kubectl -n keybrake create secret generic keybrake-vendor-secrets",
        "keybrake.dev/workflows=true",
        "keybrake db upgrade",
        SERVICE_URL,
    ]:
        assert needle in text, needle


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_deploy_doc_manifests_validate_and_use_the_same_secrets(version: str) -> None:
    docs = _doc_yaml_blocks()
    assert docs, "docs/deploy.md shows the migration Job"
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["Job", "Kustomization", "Kustomization", "NetworkPolicy"]
    for doc in docs:
        if doc["kind"] == "Kustomization":
            # Not Kubernetes API objects: the image overlay's image, the login overlay's patch.
            if "images" in doc:
                assert doc["images"][0]["name"] == IMAGE.rsplit(":", 1)[0]
            else:
                [patch] = doc["patches"]
                operations = yaml.safe_load(patch["patch"])
                settings = {op["value"]["name"] for op in operations if op["op"] == "add"}
                assert settings == {"KEYBRAKE_KUBERNETES_AUTH", "KEYBRAKE_KUBERNETES_ISSUER"}
                assert {
                    "op": "replace",
                    "path": "/spec/template/spec/automountServiceAccountToken",
                    "value": True,
                } in operations
            continue
        _validate(doc, version)
        if doc["kind"] == "Job":
            pod = doc["spec"]["template"]["spec"]
            assert doc["metadata"]["namespace"] == NAMESPACE
            assert pod["containers"][0]["image"] == IMAGE
            assert pod["containers"][0]["args"][:2] == ["db", "upgrade"]
            refs = {env: (n, k, o) for env, n, k, o in _secret_refs(pod)}
            assert refs["KEYBRAKE_DATABASE_URL"] == EXPECTED_SECRET_ENV["KEYBRAKE_DATABASE_URL"]
            assert pod["securityContext"] == _pod_spec()["securityContext"]
            for container in pod["containers"]:
                assert _secret_literals(container) == []


# --------------------------------------------------------------------------------------------
# the reaper (reaper.yaml)
# --------------------------------------------------------------------------------------------


def test_the_reaper_may_only_read_workflows_and_holds_no_admin_token() -> None:
    [rule] = _one("ClusterRole", "reaper")["rules"]
    assert rule == {
        "apiGroups": ["argoproj.io"],
        "resources": ["workflows"],
        "verbs": ["get", "list", "watch"],
    }
    binding = _one("ClusterRoleBinding", "reaper")
    account = _one("ServiceAccount", "reaper")["metadata"]
    assert binding["roleRef"]["name"] == _one("ClusterRole", "reaper")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": NAMESPACE}
    ]
    pod = _one("Deployment", "reaper")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]
    [container] = pod["containers"]
    assert container["image"] == IMAGE and container["args"] == ["reaper"]
    refs = {env: (name, key) for env, name, key, _ in _secret_refs(pod)}
    assert refs == {"KEYBRAKE_API_KEY": ("keybrake-reaper", "api_key")}  # not the admin's
    assert _secret_literals(container) == []
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_every_reaper_env_var_is_an_option_of_the_command() -> None:
    """A typo in an env var name passes every schema; catch it against `keybrake reaper`."""
    import typer.main

    from keybrake.cli.main import app

    reaper = getattr(typer.main.get_command(app), "commands")["reaper"]
    known = {param.envvar for param in reaper.params if isinstance(param.envvar, str)}
    [container] = _one("Deployment", "reaper")["spec"]["template"]["spec"]["containers"]
    names = [env["name"] for env in container["env"]]
    assert len(names) == len(set(names)) and set(names) <= known, set(names) - known
    url = next(env["value"] for env in container["env"] if env["name"] == "KEYBRAKE_URL")
    service = _one("Service")["metadata"]
    assert url == f"http://{service['name']}.{NAMESPACE}.svc.cluster.local:{PORT}"


def _runbook() -> str:
    text = DEPLOY_DOC.read_text()
    start = text.index("## Runbook: from an empty cluster to a capped run")
    return text[start : text.index("\n## ", start + 1)]


RUNBOOK_ORDER = [
    "kubectl apply -f templates/proxy/namespace.yaml",
    "create secret generic keybrake-database",
    "create secret generic keybrake-credentials",
    "create secret generic keybrake-vendor-secrets",
    "kubectl apply -f templates/rbac/proxy-kubernetes-login.yaml",
    "kubectl apply -k deploy/prod",
    "rollout status deployment/keybrake\n",
    "port-forward svc/keybrake 8080:8080",
    "create secret generic keybrake-reaper",
    "keybrake issuers create --name reaper --label-prefix argo/ --revoke-only -q",
    "rollout status deployment/keybrake-reaper",
    "-f templates/rbac/keybrake-issuer.yaml -f templates/rbac/keybrake-workload.yaml",
    "kubectl label namespace argo keybrake.dev/workflows=true",
    "keybrake issuers create --name argo --label-prefix argo/ --k8s-namespace argo",
    "kubectl -n argo apply -f templates/workflowtemplates/",
    "argo submit -n argo --from workflowtemplate/keybrake-fanout",
]


def test_the_runbook_goes_from_an_empty_cluster_to_a_capped_run_in_order() -> None:
    runbook = _runbook()
    positions = [runbook.find(step) for step in RUNBOOK_ORDER]
    assert -1 not in positions, [s for s, p in zip(RUNBOOK_ORDER, positions, strict=True) if p < 0]
    assert positions == sorted(positions), "a step comes before what it needs"
    # Each Secret the Deployments read is created in the runbook.
    for component in ("proxy", "reaper"):
        pod = _one("Deployment", component)["spec"]["template"]["spec"]
        for _, name, _, optional in _secret_refs(pod):
            assert optional or f"create secret generic {name}" in runbook, name
    # The fan-out parameters it passes are the template's.
    template = yaml.safe_load(
        (ROOT / "templates/workflowtemplates/keybrake-fanout.yaml").read_text()
    )
    declared = {p["name"] for p in template["spec"]["arguments"]["parameters"]}
    passed = set(re.findall(r"-p (\w+)=", runbook))
    assert passed and passed <= declared, passed - declared


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_the_runbook_names_exists_and_validates_strictly(version: str) -> None:
    from tests.hera.argocheck import schema as argo_schema

    named = sorted(set(re.findall(r"(templates/[\w./-]+)", _runbook())))
    assert len(named) >= 6, named
    checked = 0
    for name in named:
        path = ROOT / name.rstrip("/")
        assert path.exists(), f"the runbook names {name}, which does not exist"
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        for file in files:
            if file.name == "kustomization.yaml" or file.name.endswith(".example.yaml"):
                continue
            for doc in _load_yaml_docs(file):
                if doc["apiVersion"].startswith("argoproj.io/"):
                    assert argo_schema.all_errors(doc) == [], file
                else:
                    _validate(doc, version)
                checked += 1
    assert checked >= 10
