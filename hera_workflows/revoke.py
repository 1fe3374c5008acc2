"""The teardown revoke: the workflow's `onExit` handler, revoking the run's budget and vault key.

Argo runs the exit handler on success, failure, error, `argo stop` and after the workflow's
`activeDeadlineSeconds` (not on `argo terminate`, by design). The step revokes the run's budget by
id (the workflow-global output `keybrake_budget_id`; revoking it revokes every key drawing on it)
and its key by id (`keybrake_key_id`), or everything labelled `argo/{{workflow.name}}` when
neither id is there: Argo leaves an unresolved `{{workflow.outputs.parameters...}}` as literal
text, which the step treats as missing. "Already revoked" and an unknown id count as done. It
prints a one-line spend summary, exposes it as the output `summary` (workflow-global
`keybrake_spend_summary`), and always exits 0 so it never turns a succeeded workflow failed.
See <https://argo-workflows.readthedocs.io/en/latest/walk-through/exit-handlers/>.
"""

from __future__ import annotations

from hera.workflows import Workflow
from hera.workflows.models import (
    Arguments,
    DAGTask,
    DAGTemplate,
    EnvVar,
    Parameter,
    Template,
    ValueFrom,
)

from .budget import BUDGET_ID_GLOBAL, RunBudget
from .connection import ProxyConnection
from .errors import TemplateConfigError
from .issue import KEY_ID_GLOBAL, RUN_LABEL, VaultKey
from .retry import exit_handler_retry_strategy
from .shared_templates import SharedTemplates
from .step_pod import OUTPUT_DIR, script_step
from .workflow_context import add_template

__all__ = ["REVOKE_TEMPLATE", "SPEND_SUMMARY_GLOBAL", "revoke_on_exit", "revoke_template"]

REVOKE_TEMPLATE = "keybrake-revoke"
SPEND_SUMMARY_GLOBAL = "keybrake_spend_summary"


def revoke_template(
    name: str = REVOKE_TEMPLATE, proxy: ProxyConnection | None = None, *, budget: bool = False
) -> Template:
    """The `revoke` script template. Its inputs default to the run's key id, `proxy.url`, and
    with `budget=True` the run's budget id (a run without a budget never sets that global)."""
    proxy = proxy or ProxyConnection()
    budget_default = f"{{{{workflow.outputs.parameters.{BUDGET_ID_GLOBAL}}}}}" if budget else ""
    return script_step(
        name,
        step="revoke",
        proxy=proxy,
        inputs=[
            Parameter(
                name="key_id",
                default=f"{{{{workflow.outputs.parameters.{KEY_ID_GLOBAL}}}}}",
                description="the key to revoke; when missing, the run's label is revoked",
            ),
            Parameter(
                name="budget_id",
                default=budget_default,
                description="the run's budget to revoke, with every key drawing on it; empty: none",
            ),
            Parameter(name="proxy_url", default=proxy.url, description="the keybrake proxy"),
        ],
        outputs=[
            Parameter(
                name="summary",
                global_name=SPEND_SUMMARY_GLOBAL,
                value_from=ValueFrom(path=f"{OUTPUT_DIR}/summary", default=""),
            ),
        ],
        env=[
            EnvVar(name="KEYBRAKE_URL", value="{{inputs.parameters.proxy_url}}"),
            EnvVar(name="KEYBRAKE_KEY_ID", value="{{inputs.parameters.key_id}}"),
            EnvVar(name="KEYBRAKE_BUDGET_ID", value="{{inputs.parameters.budget_id}}"),
            EnvVar(name="KEYBRAKE_LABEL", value=RUN_LABEL),
            # The label fallback revokes this run's keys only: same namespace, same uid.
            EnvVar(name="KEYBRAKE_WORKFLOW_NAMESPACE", value="{{workflow.namespace}}"),
            EnvVar(name="KEYBRAKE_WORKFLOW_UID", value="{{workflow.uid}}"),
            EnvVar(name="KEYBRAKE_WORKFLOW_STATUS", value="{{workflow.status}}"),
        ],
        retry=exit_handler_retry_strategy(),
    )


def _shared_exit_handler(
    name: str, templates: SharedTemplates, proxy: ProxyConnection, budget: bool
) -> Template:
    """`onExit` must name a template of the workflow: a one-task DAG calling the shared revoke."""
    templates.check(proxy)
    arguments = [Parameter(name=k, value=v) for k, v in proxy.step_arguments(cluster=False).items()]
    if budget:
        value = f"{{{{workflow.outputs.parameters.{BUDGET_ID_GLOBAL}}}}}"
        arguments.append(Parameter(name="budget_id", value=value))
    return Template(
        name=name,
        dag=DAGTemplate(
            tasks=[
                DAGTask(
                    name="revoke",
                    template_ref=templates.ref("revoke"),
                    arguments=Arguments(parameters=arguments),
                )
            ]
        ),
    )


def revoke_on_exit(
    workflow: Workflow,
    key: VaultKey | RunBudget | None = None,
    *,
    name: str = REVOKE_TEMPLATE,
    proxy: ProxyConnection | None = None,
    templates: SharedTemplates | None = None,
) -> None:
    """Make revoking the run's budget and vault key the workflow's exit handler.

    Pass the `key` returned by `issue_vault_key`, or the run's budget from `issue_budget`, to
    reuse its proxy and template settings; with a budget (passed, or drawn on by the key) the
    handler revokes it, and so every key drawing on it. A workflow that already has another
    `onExit` can call `revoke_template()` from its own handler.
    """
    budget = key if isinstance(key, RunBudget) else key.budget if key is not None else None
    if key is not None:
        proxy, templates = proxy or key.proxy, templates or key.templates
    proxy = proxy or ProxyConnection()
    if workflow.on_exit not in (None, name):
        raise TemplateConfigError(
            f"the workflow already has onExit={workflow.on_exit!r}; call a task using "
            "revoke_template() from that exit handler instead"
        )
    if templates is None:
        add_template(workflow, revoke_template(name, proxy, budget=budget is not None))
    else:
        add_template(workflow, _shared_exit_handler(name, templates, proxy, budget is not None))
    workflow.on_exit = name
