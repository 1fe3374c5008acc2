"""The issue-vault-key step: the head of the DAG, asking the proxy for a capped vault key.

Inputs: vendor, allowed endpoints, expiry, and its caps: for any 24 hours, over its life, per
call, per pod (caller tag); or a run budget it draws on (see `budget`); and optionally its
constraints (whom its calls may pay or message: `keybrake.proxy.constraints`). The key is
labelled `argo/{{workflow.name}}`, with `{{workflow.namespace}}`, `{{workflow.uid}}` and the
workflow name as metadata. Outputs: `vault_key` and `key_id`; the key id is also the
workflow-global output `keybrake_key_id`, which the exit handler reads.

Note: a parameter is visible in the Workflow object (`argo get`, the UI, the archive), and so is
the vault key output. That is why a vault key is capped, scoped to endpoints, short-lived and
revoked on exit. The admin token never is a parameter.
See <https://argo-workflows.readthedocs.io/en/latest/walk-through/output-parameters/>.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hera.workflows import Task
from hera.workflows.models import EnvVar, Parameter, Template, ValueFrom

from keybrake.proxy.vendor_facts import VENDOR_NAMES

from ._issuing import (
    RUN_LABEL,
    Constraints,
    Money,
    add_issuing_task,
    constraints_argument,
    constraints_input,
    duration,
    issued_id,
    issuing_step,
    money,
    optional,
)
from .budget import RunBudget
from .connection import ProxyConnection, is_expression
from .errors import TemplateConfigError
from .shared_templates import SharedTemplates
from .step_pod import OUTPUT_DIR
from .vendors import check_vendor
from .workflow_context import current_dag, current_workflow

__all__ = [
    "ISSUE_TASK",
    "ISSUE_TEMPLATE",
    "KEY_ID_GLOBAL",
    "RUN_LABEL",
    "VaultKey",
    "issue_template",
    "issue_vault_key",
]

ISSUE_TEMPLATE = "keybrake-issue"
ISSUE_TASK = "issue-vault-key"
KEY_ID_GLOBAL = "keybrake_key_id"

_ENDPOINT = re.compile(r"^(GET|POST|PUT|PATCH|DELETE|\*) /\S*$")


def issue_template(name: str = ISSUE_TEMPLATE, proxy: ProxyConnection | None = None) -> Template:
    """The `issue` script template; `proxy.url` is the default of its `proxy_url` input."""
    return issuing_step(
        name,
        proxy,
        inputs=[
            Parameter(
                name="vendor", description=f"{', '.join(VENDOR_NAMES[:-1])} or {VENDOR_NAMES[-1]}"
            ),
            Parameter(
                name="allowed_endpoints",
                description='JSON list, e.g. ["POST /v1/payment_intents"]',
            ),
            optional("daily_usd_cap", "USD the key may spend in any 24 hours"),
            optional("total_usd_cap", "USD the key may spend over its whole life"),
            Parameter(
                name="expires_in",
                default="2h",
                description="key lifetime, e.g. 90m, 2h; empty with a budget_id: the budget's",
            ),
            optional("max_usd_per_call", "per-call cap"),
            optional(
                "max_usd_per_caller",
                "USD one fanned-out item (its pods, retries included) may spend",
            ),
            optional("budget_id", "a run budget (bg_...) the key also draws on"),
            constraints_input(),
            Parameter(
                name="delivery",
                default="secret",
                enum=list(DELIVERIES),
                description="secret: the key goes into a per-run Secret the pods read, never into "
                "the Workflow object; parameter: the output vault_key (visible in argo get)",
            ),
        ],
        outputs=[
            issued_id("key_id", KEY_ID_GLOBAL),
            Parameter(
                name="vault_key_secret",
                value_from=ValueFrom(path=f"{OUTPUT_DIR}/vault_key_secret", default=""),
                description="delivery secret: the Secret (key vault_key) the pods read",
            ),
            Parameter(
                name="vault_key",
                value_from=ValueFrom(path=f"{OUTPUT_DIR}/vault_key", default=""),
                description="delivery parameter only: the vault key itself",
            ),
        ],
        env=[EnvVar(name="KEYBRAKE_KUBE_DIR", value=KUBE_DIR)],
    )


DELIVERIES = ("secret", "parameter")
# Where Kubernetes mounts the pod's own service-account token, CA and namespace (the issue step
# creates the run's key Secret with it).
KUBE_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class VaultKey:
    """The issue task of a workflow, and what the fan-out and exit handler need to know of it."""

    task: Task
    vendor: str
    proxy: ProxyConnection
    templates: SharedTemplates | None = None
    budget: RunBudget | None = None
    delivery: str = "secret"

    @property
    def vault_key(self) -> str:
        """The key itself (delivery "parameter" only: it is then in the Workflow object)."""
        if self.delivery != "parameter":
            raise TemplateConfigError(
                'this key is delivered in a Secret (delivery="secret"), never as a parameter: '
                'use vault_key_secret, or issue it with delivery="parameter"'
            )
        return f"{{{{tasks.{self.task.name}.outputs.parameters.vault_key}}}}"

    @property
    def vault_key_secret(self) -> str:
        """The name of the Secret holding the key (data key `vault_key`), delivery "secret"."""
        return f"{{{{tasks.{self.task.name}.outputs.parameters.vault_key_secret}}}}"

    @property
    def key_id(self) -> str:
        return f"{{{{tasks.{self.task.name}.outputs.parameters.key_id}}}}"


def _endpoints(value: Sequence[str] | str) -> str:
    if isinstance(value, str):
        if is_expression(value):
            return value
        raise TemplateConfigError(
            'allowed_endpoints must be a list such as ["POST /v1/payment_intents"] '
            f"or a parameter holding that JSON list, got the string {value!r}"
        )
    items = list(value)
    bad = [e for e in items if not isinstance(e, str) or not _ENDPOINT.match(e)]
    if not items or bad:
        raise TemplateConfigError(
            "allowed_endpoints must be a non-empty list of 'METHOD /path' strings such as "
            f"'POST /v1/payment_intents', got {bad or items!r}"
        )
    return json.dumps(items)


def _key_life(expires_in: str | None, budget: RunBudget | None) -> str:
    """The key's `expires_in`: empty for a key drawing on a budget (the proxy then lets it live
    as long as the budget: a key may never outlive its budget), else 2h unless given."""
    if expires_in is None:
        return "" if budget is not None else "2h"
    return duration(expires_in)


def issue_vault_key(
    *,
    vendor: str,
    allowed_endpoints: Sequence[str] | str,
    daily_usd_cap: Money | None = None,
    total_usd_cap: Money | None = None,
    budget: RunBudget | None = None,
    expires_in: str | None = None,
    max_usd_per_call: Money | None = None,
    max_usd_per_caller: Money | None = None,
    constraints: Constraints | None = None,
    delivery: str = "secret",
    name: str = ISSUE_TASK,
    proxy: ProxyConnection | None = None,
    templates: SharedTemplates | None = None,
) -> VaultKey:
    """Add the issue-vault-key task to the current `with DAG(...)` block and return its handle.

    The key needs `daily_usd_cap` (any 24 hours) or `total_usd_cap` (its whole life), unless it
    draws on a run `budget` (from `issue_budget`), whose caps then bound it with those of every
    other key of the run. `max_usd_per_caller` caps each fanned-out item (`fan_out` tags its
    calls so that Argo's retries of an item keep counting against the same cap). `expires_in`
    defaults to 2h; a key drawing on a budget lives as long as the budget unless given one.
    `constraints` ({"customers": ["cus_1"], "mode": "enforce"}: the fields of its vendor only)
    says whom its calls may pay or message; the proxy refuses any other call with a 403.

    `delivery="secret"` (the default) keeps the key out of the Workflow object: the issue step
    writes it into a Secret of the run (deleted with it) which the fan-out pods read;
    `delivery="parameter"` passes it as an output parameter instead (visible in `argo get`).
    Every retry of the step sends the same request id (`{{workflow.uid}}/<task name>`), so a
    retried issue replaces its key instead of leaving a second one live.

    Any argument may also be an Argo expression filled in at run time, such as
    `"{{workflow.parameters.budget_usd}}"`. `templates=SharedTemplates()` references the
    installed `keybrake-vault-key` template instead of copying the step into the workflow; with
    `constraints`, that template must be one with a `constraints` input (Argo drops an argument
    its template does not declare, so an older one would issue the key without them).
    """
    what = "issue_vault_key()"
    dag = current_dag(what)
    workflow = current_workflow(what)
    proxy = proxy or (budget.proxy if budget is not None else None) or ProxyConnection()
    if delivery not in DELIVERIES:
        raise TemplateConfigError(
            f"delivery must be 'secret' (a per-run Secret) or 'parameter', got {delivery!r}"
        )
    if daily_usd_cap is None and total_usd_cap is None and budget is None:
        raise TemplateConfigError(
            "issue_vault_key() needs daily_usd_cap (any 24 hours) or total_usd_cap (the key's "
            "life), or a budget= from issue_budget() to draw on"
        )
    set_caps = {
        "daily_usd_cap": money(daily_usd_cap, "daily_usd_cap"),
        "total_usd_cap": money(total_usd_cap, "total_usd_cap"),
        "max_usd_per_call": money(max_usd_per_call, "max_usd_per_call"),
        "max_usd_per_caller": money(max_usd_per_caller, "max_usd_per_caller"),
        "budget_id": budget.budget_id if budget is not None else "",
        "constraints": constraints_argument(
            constraints, None if is_expression(vendor) else check_vendor(vendor)
        ),
    }
    # Only what is set is passed (the template's defaults are empty), so a workflow using none
    # of the newer caps or constraints still runs against templates installed by an older
    # release.
    arguments = {
        "vendor": check_vendor(vendor),
        "allowed_endpoints": _endpoints(allowed_endpoints),
        "expires_in": _key_life(expires_in, budget),
        **{name: value for name, value in set_caps.items() if value},
        "delivery": delivery,
    }
    task = add_issuing_task(
        dag,
        workflow,
        name=name,
        template=ISSUE_TEMPLATE,
        build=issue_template,
        shared="issue",
        templates=templates,
        proxy=proxy,
        arguments=arguments,
        depends=budget.task.name if budget is not None else None,
    )
    return VaultKey(
        task=task,
        vendor=vendor,
        proxy=proxy,
        templates=templates,
        budget=budget,
        delivery=delivery,
    )
