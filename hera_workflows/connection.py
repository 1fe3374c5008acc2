"""How the keybrake steps reach the proxy, and how they prove who they are.

The URL is a template parameter with an in-cluster default. No credential is ever a parameter
(parameters are stored in the Workflow object, shown by `argo get` and kept in the archive):

- `auth="serviceaccount"` (the default): each keybrake step pod runs as `service_account`
  (`keybrake-issuer`, shipped in templates/rbac/; None: the workflow's) and presents a projected
  service-account token for `audience`, which the kubelet mounts from a projected volume and
  rotates, valid for `token_expiration_seconds`. The proxy verifies it against the cluster and
  acts as the issuer bound to that namespace and service account (`keybrake issuers create
  --k8s-namespace ...`): the workflow namespace holds no keybrake secret at all.
- `auth="token"`: the steps read an issuer token (`keybrake issuers create`, never the admin
  token) from the Secret `secret_name`, key `secret_key`.

`ca_configmap` names a ConfigMap whose `ca.crt` is the CA of an https proxy. `step_image` is the
image the keybrake steps run in (any image with Python 3.11+ and nothing else: mirror
`python:3.12-alpine` into a private registry for an air-gapped cluster). `cluster` names the
cluster in each key's metadata, so that `keybrake reaper --cluster` touches only its own runs.
See <https://kubernetes.io/docs/concepts/storage/projected-volumes/#serviceaccounttoken>.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hera.workflows.models import (
    ConfigMapProjection,
    EnvVar,
    EnvVarSource,
    KeyToPath,
    ProjectedVolumeSource,
    SecretKeySelector,
    ServiceAccountTokenProjection,
    Volume,
    VolumeMount,
    VolumeProjection,
)

from .errors import TemplateConfigError

__all__ = [
    "ADMIN_TOKEN_ENV",
    "CA_BUNDLE",
    "DEFAULT_CLUSTER",
    "DEFAULT_PROXY_URL",
    "DEFAULT_SECRET_KEY",
    "DEFAULT_SECRET_NAME",
    "ISSUER_SERVICE_ACCOUNT",
    "STEP_IMAGE",
    "TOKEN_FILE",
    "ProxyConnection",
    "is_expression",
]

DEFAULT_PROXY_URL = "http://keybrake.keybrake.svc.cluster.local:8080"
DEFAULT_SECRET_NAME = "keybrake-credentials"  # noqa: S105 - a Secret's name, not a secret
DEFAULT_SECRET_KEY = "api_key"  # noqa: S105 - a key within that Secret
ADMIN_TOKEN_ENV = "KEYBRAKE_API_KEY"  # noqa: S105 - an env var name, as the keybrake CLI reads
ISSUER_SERVICE_ACCOUNT = "keybrake-issuer"
STEP_IMAGE = "python:3.12-alpine"
DEFAULT_CLUSTER = "default"
TOKEN_DIR = "/var/run/secrets/keybrake"  # noqa: S105 - a mount path
TOKEN_FILE = f"{TOKEN_DIR}/token"
CA_DIR = "/etc/keybrake/ca"
CA_BUNDLE = f"{CA_DIR}/ca.crt"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_AUTH = ("serviceaccount", "token")
# Fields a published template takes as parameters, so they may be `{{...}}` expressions.
_SETTABLE = ("service_account", "cluster")


def is_expression(value: str) -> bool:
    """True for a value Argo fills in at run time, such as `{{workflow.parameters.budget_usd}}`."""
    return "{{" in value


@dataclass(frozen=True)
class ProxyConnection:
    """Where the steps find the proxy, and the credential they present."""

    url: str = DEFAULT_PROXY_URL
    auth: str = "serviceaccount"
    service_account: str | None = ISSUER_SERVICE_ACCOUNT
    audience: str = "keybrake"
    token_expiration_seconds: int = 600
    secret_name: str = DEFAULT_SECRET_NAME
    secret_key: str = DEFAULT_SECRET_KEY
    ca_configmap: str | None = None
    step_image: str = STEP_IMAGE
    cluster: str = DEFAULT_CLUSTER

    def __post_init__(self) -> None:
        if not is_expression(self.url) and not self.url.startswith(("http://", "https://")):
            raise TemplateConfigError(
                f"proxy url must start with http:// or https://, got {self.url!r} "
                f"(e.g. {DEFAULT_PROXY_URL})"
            )
        if self.auth not in _AUTH:
            raise TemplateConfigError(
                f"auth must be 'serviceaccount' (a projected token, no secret) or 'token' "
                f"(an issuer token from a Secret), got {self.auth!r}"
            )
        for what, value in (
            ("service_account", self.service_account or "x"),
            ("secret_name", self.secret_name),
            ("ca_configmap", self.ca_configmap or "x"),
            ("cluster", self.cluster),
        ):
            if not _NAME.match(value) and not (what in _SETTABLE and is_expression(value)):
                raise TemplateConfigError(f"{what} must be a Kubernetes name, got {value!r}")
        if not self.step_image or any(c.isspace() for c in self.step_image):
            raise TemplateConfigError(
                f"step_image must be an image reference, got {self.step_image!r} "
                f"(e.g. registry.example.com/mirror/{STEP_IMAGE})"
            )
        if not _SECRET_KEY.match(self.secret_key):
            raise TemplateConfigError(
                f"secret_key must be a Secret data key, got {self.secret_key!r}"
            )
        if not 600 <= self.token_expiration_seconds <= 86400:
            raise TemplateConfigError(
                "token_expiration_seconds: Kubernetes projects tokens for 600 to 86400 seconds, "
                f"got {self.token_expiration_seconds}"
            )

    def credential_env(self) -> list[EnvVar]:
        """The step pod's credential: where its projected token is, or the issuer token."""
        env = []
        if self.auth == "serviceaccount":
            env.append(EnvVar(name="KEYBRAKE_TOKEN_FILE", value=TOKEN_FILE))
        else:
            env.append(
                EnvVar(
                    name=ADMIN_TOKEN_ENV,
                    value_from=EnvVarSource(
                        secret_key_ref=SecretKeySelector(name=self.secret_name, key=self.secret_key)
                    ),
                )
            )
        if self.ca_configmap:
            env.append(EnvVar(name="KEYBRAKE_CA_BUNDLE", value=CA_BUNDLE))
        return env

    def volumes(self) -> list[Volume]:
        volumes = []
        if self.auth == "serviceaccount":
            token = ServiceAccountTokenProjection(
                audience=self.audience,
                expiration_seconds=self.token_expiration_seconds,
                path="token",
            )
            volumes.append(
                Volume(
                    name="keybrake-token",
                    projected=ProjectedVolumeSource(
                        sources=[VolumeProjection(service_account_token=token)]
                    ),
                )
            )
        if self.ca_configmap:
            ca = ConfigMapProjection(
                name=self.ca_configmap, items=[KeyToPath(key="ca.crt", path="ca.crt")]
            )
            volumes.append(
                Volume(
                    name="keybrake-ca",
                    projected=ProjectedVolumeSource(sources=[VolumeProjection(config_map=ca)]),
                )
            )
        return volumes

    def volume_mounts(self) -> list[VolumeMount]:
        mounts = []
        if self.auth == "serviceaccount":
            mounts.append(VolumeMount(name="keybrake-token", mount_path=TOKEN_DIR, read_only=True))
        if self.ca_configmap:
            mounts.append(VolumeMount(name="keybrake-ca", mount_path=CA_DIR, read_only=True))
        return mounts

    def step_arguments(self, *, cluster: bool) -> dict[str, str]:
        """What a task passes to a keybrake step template: the proxy URL, and the step image,
        service account and cluster only when they are not the templates' defaults, so that a
        workflow keeping them still runs against templates installed by an older release."""
        arguments = {"proxy_url": self.url}
        if self.step_image != STEP_IMAGE:
            arguments["step_image"] = self.step_image
        if self.service_account and self.service_account != ISSUER_SERVICE_ACCOUNT:
            arguments["service_account"] = self.service_account
        if cluster and self.cluster != DEFAULT_CLUSTER:
            arguments["cluster"] = self.cluster
        return arguments

    @property
    def pod_service_account(self) -> str | None:
        """The keybrake step pods' service account (None: the workflow's): the one bound to an
        issuer, and allowed to create the run's key Secret (templates/rbac/)."""
        return self.service_account
