"""The issue-vault-key step: the head of the DAG, asking the proxy for a capped vault key.

Inputs: vendor, daily USD cap, allowed endpoints, expiry, optional per-call cap. The key is
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
from decimal import Decimal, InvalidOperation

from hera.workflows import Task
from hera.workflows.models import EnvVar, Parameter, Template, ValueFrom

from .connection import ProxyConnection, is_expression
from .errors import TemplateConfigError
from .retry import default_retry_strategy
from .shared_templates import SharedTemplates
from .step_pod import OUTPUT_DIR, script_step
from .vendors import check_vendor
from .workflow_context import add_template, current_dag, current_workflow

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
RUN_LABEL = "argo/{{workflow.name}}"

Money = int | Decimal | str
_ENDPOINT = re.compile(r"^(GET|POST|PUT|PATCH|DELETE|\*) /\S*$")
_DURATION = re.compile(r"^[1-9][0-9]*[smhd]$")


def issue_template(name: str = ISSUE_TEMPLATE, proxy: ProxyConnection | None = None) -> Template:
    """The `issue` script template; `proxy.url` is the default of its `proxy_url` input."""
    proxy = proxy or ProxyConnection()

    def given(parameter: str) -> str:
        return f"{{{{inputs.parameters.{parameter}}}}}"

    return script_step(
        name,
        step="issue",
        inputs=[
            Parameter(name="vendor", description="stripe, twilio or resend"),
            Parameter(name="daily_usd_cap", description="USD the key may spend in any 24 hours"),
            Parameter(
                name="allowed_endpoints",
                description='JSON list, e.g. ["POST /v1/payment_intents"]',
            ),
            Parameter(name="expires_in", default="2h", description="key lifetime, e.g. 90m, 2h"),
            Parameter(name="max_usd_per_call", default="", description="per-call cap; empty: none"),
            Parameter(name="proxy_url", default=proxy.url, description="the keybrake proxy"),
        ],
        outputs=[
            Parameter(
                name="key_id",
                global_name=KEY_ID_GLOBAL,
                value_from=ValueFrom(path=f"{OUTPUT_DIR}/key_id"),
            ),
            Parameter(name="vault_key", value_from=ValueFrom(path=f"{OUTPUT_DIR}/vault_key")),
        ],
        env=[
            EnvVar(name="KEYBRAKE_URL", value=given("proxy_url")),
            proxy.admin_token_env(),
            EnvVar(name="KEYBRAKE_VENDOR", value=given("vendor")),
            EnvVar(name="KEYBRAKE_DAILY_USD_CAP", value=given("daily_usd_cap")),
            EnvVar(name="KEYBRAKE_ALLOWED_ENDPOINTS", value=given("allowed_endpoints")),
            EnvVar(name="KEYBRAKE_EXPIRES_IN", value=given("expires_in")),
            EnvVar(name="KEYBRAKE_MAX_USD_PER_CALL", value=given("max_usd_per_call")),
            EnvVar(name="KEYBRAKE_LABEL", value=RUN_LABEL),
            EnvVar(name="KEYBRAKE_WORKFLOW_NAME", value="{{workflow.name}}"),
            EnvVar(name="KEYBRAKE_WORKFLOW_NAMESPACE", value="{{workflow.namespace}}"),
            EnvVar(name="KEYBRAKE_WORKFLOW_UID", value="{{workflow.uid}}"),
        ],
        retry=default_retry_strategy(limit=2),
    )


@dataclass(frozen=True)
class VaultKey:
    """The issue task of a workflow, and what the fan-out and exit handler need to know of it."""

    task: Task
    vendor: str
    proxy: ProxyConnection
    templates: SharedTemplates | None = None

    @property
    def vault_key(self) -> str:
        return f"{{{{tasks.{self.task.name}.outputs.parameters.vault_key}}}}"

    @property
    def key_id(self) -> str:
        return f"{{{{tasks.{self.task.name}.outputs.parameters.key_id}}}}"


def _money(value: Money | None, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str) and is_expression(value):
        return value
    if isinstance(value, bool | float):
        raise TemplateConfigError(
            f"{what} must be an int, Decimal or string such as '12.50', got {value!r}"
        )
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise TemplateConfigError(
            f"{what} must be a dollar amount such as 300 or '12.50', got {value!r}"
        ) from None
    if not amount.is_finite() or amount <= 0:
        raise TemplateConfigError(f"{what} must be a positive dollar amount, got {value!r}")
    return str(amount)


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


def _duration(value: str) -> str:
    if is_expression(value) or _DURATION.match(value):
        return value
    raise TemplateConfigError(f"expires_in must be a duration such as 30m, 2h or 7d, got {value!r}")


def issue_vault_key(
    *,
    vendor: str,
    daily_usd_cap: Money,
    allowed_endpoints: Sequence[str] | str,
    expires_in: str = "2h",
    max_usd_per_call: Money | None = None,
    name: str = ISSUE_TASK,
    proxy: ProxyConnection | None = None,
    templates: SharedTemplates | None = None,
) -> VaultKey:
    """Add the issue-vault-key task to the current `with DAG(...)` block and return its handle.

    Any argument may also be an Argo expression filled in at run time, such as
    `"{{workflow.parameters.budget_usd}}"`. `templates=SharedTemplates()` references the
    installed `keybrake-vault-key` template instead of copying the step into the workflow.
    """
    what = "issue_vault_key()"
    dag = current_dag(what)
    workflow = current_workflow(what)
    proxy = proxy or ProxyConnection()
    arguments = {
        "vendor": check_vendor(vendor),
        "daily_usd_cap": _money(daily_usd_cap, "daily_usd_cap"),
        "allowed_endpoints": _endpoints(allowed_endpoints),
        "expires_in": _duration(expires_in),
        "max_usd_per_call": _money(max_usd_per_call, "max_usd_per_call"),
        "proxy_url": proxy.url,
    }
    for task in dag.tasks:
        if getattr(task, "name", None) == name:
            raise TemplateConfigError(f"the DAG already has a task named {name!r}; pass name=...")
    if templates is None:
        add_template(workflow, issue_template(ISSUE_TEMPLATE, proxy))
        task = Task(name=name, template=ISSUE_TEMPLATE, arguments=arguments)
    else:
        templates.check(proxy)
        task = Task(name=name, template_ref=templates.ref("issue"), arguments=arguments)
    return VaultKey(task=task, vendor=vendor, proxy=proxy, templates=templates)
