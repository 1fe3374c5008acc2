"""How the keybrake steps reach the proxy: its URL and the Secret holding the admin token.

The URL is a template parameter with an in-cluster default. The admin token is read from a
Kubernetes Secret into the step pod's environment (`secretKeyRef`), never passed as a parameter:
parameters are stored in the Workflow object, shown by `argo get` and kept in the archive.
See <https://argo-workflows.readthedocs.io/en/latest/walk-through/secrets/>.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hera.workflows.models import EnvVar, EnvVarSource, SecretKeySelector

from .errors import TemplateConfigError

__all__ = [
    "ADMIN_TOKEN_ENV",
    "DEFAULT_PROXY_URL",
    "DEFAULT_SECRET_KEY",
    "DEFAULT_SECRET_NAME",
    "ProxyConnection",
    "is_expression",
]

DEFAULT_PROXY_URL = "http://keybrake.keybrake.svc.cluster.local:8080"
DEFAULT_SECRET_NAME = "keybrake-credentials"  # noqa: S105 - a Secret's name, not a secret
DEFAULT_SECRET_KEY = "api_key"  # noqa: S105 - a key within that Secret
ADMIN_TOKEN_ENV = "KEYBRAKE_API_KEY"  # noqa: S105 - an env var name, as the keybrake CLI reads

_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def is_expression(value: str) -> bool:
    """True for a value Argo fills in at run time, such as `{{workflow.parameters.budget_usd}}`."""
    return "{{" in value


@dataclass(frozen=True)
class ProxyConnection:
    """Where the steps find the proxy, and which Secret key holds the admin token."""

    url: str = DEFAULT_PROXY_URL
    secret_name: str = DEFAULT_SECRET_NAME
    secret_key: str = DEFAULT_SECRET_KEY

    def __post_init__(self) -> None:
        if not is_expression(self.url) and not self.url.startswith(("http://", "https://")):
            raise TemplateConfigError(
                f"proxy url must start with http:// or https://, got {self.url!r} "
                f"(e.g. {DEFAULT_PROXY_URL})"
            )
        if not _SECRET_NAME.match(self.secret_name):
            raise TemplateConfigError(
                f"secret_name must be a Kubernetes Secret name, got {self.secret_name!r}"
            )
        if not _SECRET_KEY.match(self.secret_key):
            raise TemplateConfigError(
                f"secret_key must be a Secret data key, got {self.secret_key!r}"
            )

    def admin_token_env(self) -> EnvVar:
        """The step pod's `KEYBRAKE_API_KEY`, read from the Secret."""
        return EnvVar(
            name=ADMIN_TOKEN_ENV,
            value_from=EnvVarSource(
                secret_key_ref=SecretKeySelector(name=self.secret_name, key=self.secret_key)
            ),
        )
