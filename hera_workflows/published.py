"""The templates keybrake publishes in templates/, each as a WorkflowTemplate and as a
ClusterWorkflowTemplate:

- `keybrake-vault-key`: the `issue`, `budget` and `revoke` steps alone, for `templateRef` from any
  workflow.
- `keybrake-fanout`: a complete DAG (issue, fan out over the `items` JSON parameter running
  `image`, revoke on exit), submittable as `argo submit --from workflowtemplate/keybrake-fanout
  -p items='[...]' -p image=... -p budget_usd=300`. `budget_usd` is the run's total cap: the
  whole run can never move more, however long it lives (in 0.1 it was a daily cap: CHANGELOG.md).

Both are built with the same building blocks users call, so they cannot drift from the library.
See <https://argo-workflows.readthedocs.io/en/latest/workflow-templates/>.
"""

from __future__ import annotations

import json

from hera.workflows import DAG, ClusterWorkflowTemplate, Parameter, WorkflowTemplate

from keybrake.proxy.vendor_facts import STRIPE, VENDOR_NAMES

from .budget import budget_template
from .connection import (
    DEFAULT_CLUSTER,
    DEFAULT_PROXY_URL,
    ISSUER_SERVICE_ACCOUNT,
    STEP_IMAGE,
    ProxyConnection,
)
from .fanout import fan_out
from .issue import issue_template, issue_vault_key
from .revoke import revoke_on_exit, revoke_template
from .shared_templates import VAULT_KEY_TEMPLATE

__all__ = ["FANOUT_PARALLELISM", "FANOUT_TEMPLATE", "VAULT_KEY_TEMPLATE", "fanout", "vault_key"]

FANOUT_TEMPLATE = "keybrake-fanout"
WORKLOAD_SERVICE_ACCOUNT = "keybrake-workload"
FANOUT_PARALLELISM = 10
_DEFAULT_VENDOR = STRIPE  # keybrake-fanout's `vendor` and `allowed_endpoints` unless given
_DESCRIPTION = "workflows.argoproj.io/description"

TemplateKind = type[WorkflowTemplate] | type[ClusterWorkflowTemplate]


def vault_key(kind: TemplateKind = WorkflowTemplate) -> WorkflowTemplate:
    """`keybrake-vault-key`: templates `issue`, `budget` and `revoke`."""
    return kind(
        name=VAULT_KEY_TEMPLATE,
        annotations={
            _DESCRIPTION: (
                "keybrake vault keys for any workflow: templateRef `issue` at the head of your DAG "
                "(outputs vault_key, key_id; global keybrake_key_id), `budget` for a run budget "
                "several keys share (output budget_id; global keybrake_budget_id) and `revoke` "
                "from your onExit handler (pass it budget_id when the run has a budget). The steps "
                "run as service_account (default keybrake-issuer, templates/rbac/) and log in "
                "with a projected service-account token; step_image and cluster are inputs too."
            )
        },
        templates=[issue_template("issue"), budget_template("budget"), revoke_template("revoke")],
    )


def fanout(kind: TemplateKind = WorkflowTemplate) -> WorkflowTemplate:
    """`keybrake-fanout`: issue a key, run `image` once per item of `items`, revoke on exit."""

    def workflow_parameter(name: str) -> str:
        return f"{{{{workflow.parameters.{name}}}}}"

    with kind(
        name=FANOUT_TEMPLATE,
        entrypoint="main",
        annotations={
            _DESCRIPTION: (
                "Issue a capped vault key, run `image` once per item of the JSON list `items` "
                f"(at most {FANOUT_PARALLELISM} at a time; the item is the container's argument "
                "and $KEYBRAKE_ITEM, the key is in the vendor SDK's environment), then revoke "
                "the key and print the spend."
            )
        },
        arguments=[
            Parameter(name="items", description='JSON list, one pod per item, e.g. ["a", "b"]'),
            Parameter(name="image", description="container image run once per item"),
            Parameter(
                name="budget_usd",
                description="USD the whole run may spend, however long it lives (the key's "
                "total cap)",
            ),
            Parameter(name="vendor", value=_DEFAULT_VENDOR.name, enum=list(VENDOR_NAMES)),
            Parameter(
                name="allowed_endpoints",
                value=json.dumps(list(_DEFAULT_VENDOR.usual_endpoints)),
                description="JSON list of 'METHOD /path' the key may call",
            ),
            Parameter(name="expires_in", value="2h", description="key lifetime"),
            Parameter(name="max_usd_per_call", value="", description="per-call cap; empty: none"),
            Parameter(
                name="max_usd_per_pod",
                value="",
                description="USD one item may spend, its retries included; empty: none",
            ),
            Parameter(
                name="constraints",
                value="",
                description="JSON object of whom the pods' calls may pay or message, e.g. "
                '{"customers": ["cus_1"], "currencies": ["usd"]}; empty: none',
            ),
            Parameter(
                name="workload_service_account",
                value=WORKLOAD_SERVICE_ACCOUNT,
                description="service account of the pods run once per item: it may not create "
                "Secrets and gets no keybrake token (templates/rbac/)",
            ),
            Parameter(name="proxy_url", value=DEFAULT_PROXY_URL, description="keybrake proxy"),
            Parameter(
                name="issuer_service_account",
                value=ISSUER_SERVICE_ACCOUNT,
                description="service account of the keybrake steps, bound to an issuer "
                "(templates/rbac/)",
            ),
            Parameter(
                name="step_image",
                value=STEP_IMAGE,
                description="image of the keybrake steps (Python 3.11+; a private mirror for "
                "air-gapped clusters)",
            ),
            Parameter(
                name="cluster",
                value=DEFAULT_CLUSTER,
                description="this cluster's name, recorded with the key for keybrake reaper",
            ),
        ],
    ) as template:
        with DAG(name="main"):
            key = issue_vault_key(
                vendor=workflow_parameter("vendor"),
                total_usd_cap=workflow_parameter("budget_usd"),
                allowed_endpoints=workflow_parameter("allowed_endpoints"),
                expires_in=workflow_parameter("expires_in"),
                max_usd_per_call=workflow_parameter("max_usd_per_call"),
                max_usd_per_caller=workflow_parameter("max_usd_per_pod"),
                constraints=workflow_parameter("constraints"),
                proxy=ProxyConnection(
                    url=workflow_parameter("proxy_url"),
                    service_account=workflow_parameter("issuer_service_account"),
                    step_image=workflow_parameter("step_image"),
                    cluster=workflow_parameter("cluster"),
                ),
            )
            fan_out(
                key,
                "run",
                image=workflow_parameter("image"),
                with_param=workflow_parameter("items"),
                parallelism=FANOUT_PARALLELISM,
                service_account=workflow_parameter("workload_service_account"),
            )
        revoke_on_exit(template, key)
    return template
