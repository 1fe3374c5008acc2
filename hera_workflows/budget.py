"""The issue-budget step: a run's budget, one cap shared by every vault key of the run.

Keys issued with `budget=` draw on it whatever their vendor: a call is admitted only if its key's
caps and the budget's all hold, reserved in one atomic step. `total_usd_cap` bounds the run's whole
life, however long it runs; `daily_usd_cap` any 24 hours. The budget is labelled
`argo/{{workflow.name}}` like the run's keys; its id is the output `budget_id` and the
workflow-global output `keybrake_budget_id`, which the exit handler revokes (revoking a budget
revokes every key drawing on it).
See <https://argo-workflows.readthedocs.io/en/latest/walk-through/output-parameters/>.
"""

from __future__ import annotations

from dataclasses import dataclass

from hera.workflows import Task
from hera.workflows.models import EnvVar, Parameter, Template

from ._issuing import (
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
from .connection import ProxyConnection
from .errors import TemplateConfigError
from .shared_templates import SharedTemplates
from .workflow_context import current_dag, current_workflow

__all__ = [
    "BUDGET_ID_GLOBAL",
    "BUDGET_TASK",
    "BUDGET_TEMPLATE",
    "RunBudget",
    "budget_template",
    "issue_budget",
]

BUDGET_TEMPLATE = "keybrake-budget"
BUDGET_TASK = "issue-budget"
BUDGET_ID_GLOBAL = "keybrake_budget_id"


def budget_template(name: str = BUDGET_TEMPLATE, proxy: ProxyConnection | None = None) -> Template:
    """The `budget` script template (the issue step, creating a budget)."""
    return issuing_step(
        name,
        proxy,
        outputs=[issued_id("budget_id", BUDGET_ID_GLOBAL)],
        env=[EnvVar(name="KEYBRAKE_ISSUE", value="budget")],
        inputs=[
            optional("total_usd_cap", "USD the whole run may spend, however long it lives"),
            optional("daily_usd_cap", "USD the run may spend in any 24 hours"),
            Parameter(name="expires_in", default="6h", description="budget lifetime, e.g. 6h"),
            constraints_input(),
        ],
    )


@dataclass(frozen=True)
class RunBudget:
    """The issue-budget task of a workflow: keys pass it as `budget=` to draw on it."""

    task: Task
    proxy: ProxyConnection
    templates: SharedTemplates | None = None

    @property
    def budget_id(self) -> str:
        return f"{{{{tasks.{self.task.name}.outputs.parameters.budget_id}}}}"


def issue_budget(
    *,
    total_usd_cap: Money | None = None,
    daily_usd_cap: Money | None = None,
    expires_in: str = "6h",
    constraints: Constraints | None = None,
    name: str = BUDGET_TASK,
    proxy: ProxyConnection | None = None,
    templates: SharedTemplates | None = None,
) -> RunBudget:
    """Add the issue-budget task to the current `with DAG(...)` block and return its handle;
    pass it to `issue_vault_key(budget=...)`. `constraints` (any vendor's fields) holds every
    key drawing on it to those of its own vendor, besides the key's own. Any argument may be an
    Argo expression."""
    what = "issue_budget()"
    dag = current_dag(what)
    workflow = current_workflow(what)
    proxy = proxy or ProxyConnection()
    if total_usd_cap is None and daily_usd_cap is None:
        raise TemplateConfigError(
            "issue_budget() needs total_usd_cap (the run's whole life) and/or daily_usd_cap"
        )
    caps = {
        "total_usd_cap": money(total_usd_cap, "total_usd_cap"),
        "daily_usd_cap": money(daily_usd_cap, "daily_usd_cap"),
        "constraints": constraints_argument(constraints),
    }
    arguments = {
        **{name: value for name, value in caps.items() if value},
        "expires_in": duration(expires_in),
    }
    task = add_issuing_task(
        dag,
        workflow,
        name=name,
        template=BUDGET_TEMPLATE,
        build=budget_template,
        shared="budget",
        templates=templates,
        proxy=proxy,
        arguments=arguments,
    )
    return RunBudget(task=task, proxy=proxy, templates=templates)
