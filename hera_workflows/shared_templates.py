"""Where a workflow's issue and revoke steps come from: inline copies, or the shared templates.

By default the building blocks copy the `keybrake-issue` and `keybrake-revoke` script templates
into your workflow, so it runs on any cluster. With `SharedTemplates()` they instead reference the
installed `keybrake-vault-key` WorkflowTemplate (or ClusterWorkflowTemplate, `cluster_scope=True`)
with `templateRef`, so a cluster operator upgrades the steps in one place.
See <https://argo-workflows.readthedocs.io/en/latest/workflow-templates/#referencing-other-workflowtemplates>.
"""

from __future__ import annotations

from dataclasses import dataclass

from hera.workflows.models import TemplateRef

from .connection import DEFAULT_SECRET_KEY, DEFAULT_SECRET_NAME, ProxyConnection
from .errors import TemplateConfigError

__all__ = ["VAULT_KEY_TEMPLATE", "SharedTemplates"]

VAULT_KEY_TEMPLATE = "keybrake-vault-key"


@dataclass(frozen=True)
class SharedTemplates:
    """Reference the installed `keybrake-vault-key` templates (`issue`, `revoke`)."""

    name: str = VAULT_KEY_TEMPLATE
    cluster_scope: bool = False

    def ref(self, template: str) -> TemplateRef:
        return TemplateRef(
            name=self.name, template=template, cluster_scope=self.cluster_scope or None
        )

    def check(self, proxy: ProxyConnection) -> None:
        """The shared templates read the default Secret; another one needs inline templates."""
        if (proxy.secret_name, proxy.secret_key) != (DEFAULT_SECRET_NAME, DEFAULT_SECRET_KEY):
            raise TemplateConfigError(
                f"the shared {self.name} templates read Secret {DEFAULT_SECRET_NAME}, key "
                f"{DEFAULT_SECRET_KEY}; to read {proxy.secret_name}/{proxy.secret_key}, "
                "use inline templates (templates=None)"
            )
        if proxy.pod_service_account is None:
            raise TemplateConfigError(
                f"the shared {self.name} templates run their steps as a named service account "
                "(service_account, default keybrake-issuer); to run them as the workflow's, use "
                "inline templates (templates=None)"
            )
