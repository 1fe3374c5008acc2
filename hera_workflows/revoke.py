"""The teardown revoke: the workflow's `onExit` handler, revoking the run's vault key.

Argo runs the exit handler on success, failure, error, `argo stop` and after the workflow's
`activeDeadlineSeconds` (not on `argo terminate`, by design). The step revokes by key id (the
workflow-global output `keybrake_key_id`), or by the label `argo/{{workflow.name}}` when the key id
is missing: Argo leaves an unresolved `{{workflow.outputs.parameters...}}` as literal text, which
the step treats as missing. "Already revoked" and an unknown key id count as done. It prints a
one-line spend summary, exposes it as the output `summary` (workflow-global
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


def revoke_template(name: str = REVOKE_TEMPLATE, proxy: ProxyConnection | None = None) -> Template:
    """The `revoke` script template. Its inputs default to the run's key id and `proxy.url`."""
    proxy = proxy or ProxyConnection()
    return script_step(
        name,
        step="revoke",
        inputs=[
            Parameter(
                name="key_id",
                default=f"{{{{workflow.outputs.parameters.{KEY_ID_GLOBAL}}}}}",
                description="the key to revoke; when missing, the run's label is revoked",
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
            proxy.admin_token_env(),
            EnvVar(name="KEYBRAKE_KEY_ID", value="{{inputs.parameters.key_id}}"),
            EnvVar(name="KEYBRAKE_LABEL", value=RUN_LABEL),
            EnvVar(name="KEYBRAKE_WORKFLOW_STATUS", value="{{workflow.status}}"),
        ],
        retry=exit_handler_retry_strategy(),
    )


def _shared_exit_handler(name: str, templates: SharedTemplates, proxy: ProxyConnection) -> Template:
    """`onExit` must name a template of the workflow: a one-task DAG calling the shared revoke."""
    templates.check(proxy)
    return Template(
        name=name,
        dag=DAGTemplate(
            tasks=[
                DAGTask(
                    name="revoke",
                    template_ref=templates.ref("revoke"),
                    arguments=Arguments(parameters=[Parameter(name="proxy_url", value=proxy.url)]),
                )
            ]
        ),
    )


def revoke_on_exit(
    workflow: Workflow,
    key: VaultKey | None = None,
    *,
    name: str = REVOKE_TEMPLATE,
    proxy: ProxyConnection | None = None,
    templates: SharedTemplates | None = None,
) -> None:
    """Make revoking the run's vault key the workflow's exit handler.

    Pass the `key` returned by `issue_vault_key` to reuse its proxy and template settings. A
    workflow that already has another `onExit` can call `revoke_template()` from its own handler.
    """
    if key is not None:
        proxy, templates = proxy or key.proxy, templates or key.templates
    proxy = proxy or ProxyConnection()
    if workflow.on_exit not in (None, name):
        raise TemplateConfigError(
            f"the workflow already has onExit={workflow.on_exit!r}; call a task using "
            "revoke_template() from that exit handler instead"
        )
    if templates is None:
        add_template(workflow, revoke_template(name, proxy))
    else:
        add_template(workflow, _shared_exit_handler(name, templates, proxy))
    workflow.on_exit = name
