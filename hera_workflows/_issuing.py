"""What every issuing step (the issue-vault-key and issue-budget steps) shares: its script
template's common inputs and environment, the checks of dollar amounts, durations and
constraints, and adding its task to the DAG.

A module of its own so that `budget` and `issue` both import it, never each other's helpers:
`issue` imports `budget` (a key may draw on a run budget), so `budget` must not import `issue`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeAlias

from hera.workflows import DAG, Task, Workflow
from hera.workflows.models import EnvVar, Parameter, Template, ValueFrom

from keybrake.proxy.constraints import parse_constraints

from ._step_common import InputError, usd
from .connection import ProxyConnection, is_expression
from .errors import TemplateConfigError
from .retry import default_retry_strategy
from .shared_templates import SharedTemplates
from .step_pod import OUTPUT_DIR, script_step
from .workflow_context import add_template

__all__ = [
    "RUN_LABEL",
    "Constraints",
    "Money",
    "add_issuing_task",
    "constraints_argument",
    "constraints_input",
    "duration",
    "given",
    "issued_id",
    "issuing_step",
    "money",
    "optional",
]

RUN_LABEL = "argo/{{workflow.name}}"

Money = int | Decimal | str
# Constraints as the building blocks take them: a mapping such as {"customers": ["cus_1"]}, or an
# Argo expression holding that JSON object.
Constraints: TypeAlias = Mapping[str, Any] | str
_DURATION = re.compile(r"^[1-9][0-9]*[smhd]$")


def given(parameter: str) -> str:
    """The value of the template's input `parameter`."""
    return f"{{{{inputs.parameters.{parameter}}}}}"


def optional(name: str, description: str) -> Parameter:
    """An input that may be left empty (not set)."""
    return Parameter(name=name, default="", description=f"{description}; empty: none")


def constraints_input() -> Parameter:
    """The issue and budget templates' `constraints` input: empty (the default) sends none, so a
    workflow written before it existed issues exactly what it did."""
    return optional(
        "constraints",
        "JSON object of whom the calls may pay or message, sent as the request's constraints, "
        'e.g. {"customers": ["cus_1"], "currencies": ["usd"], "mode": "enforce"}',
    )


def _issuing_inputs(proxy: ProxyConnection) -> list[Parameter]:
    """The inputs every issuing step (a key, a budget) takes besides what it issues."""
    return [
        Parameter(
            name="request_id",
            default="",
            description="the same for every retry of this step (a retry then replaces what an "
            "earlier attempt issued, never adds); empty: derived from the run and the request",
        ),
        Parameter(name="proxy_url", default=proxy.url, description="the keybrake proxy"),
        Parameter(
            name="cluster",
            default=proxy.cluster,
            description="this cluster's name, recorded with the key (for keybrake reaper)",
        ),
    ]


def _input_env(inputs: Sequence[Parameter]) -> list[EnvVar]:
    """Each input reaches the step script as KEYBRAKE_<NAME> (the proxy's URL as KEYBRAKE_URL):
    never spliced into the script's source, so no parameter value can change its code."""
    return [
        EnvVar(
            name="KEYBRAKE_URL" if p.name == "proxy_url" else f"KEYBRAKE_{p.name.upper()}",
            value=given(p.name),
        )
        for p in inputs
    ]


# The run's label and identity, which the proxy records with what a step issues.
_RUN_ENV = [
    EnvVar(name="KEYBRAKE_LABEL", value=RUN_LABEL),
    EnvVar(name="KEYBRAKE_WORKFLOW_NAME", value="{{workflow.name}}"),
    EnvVar(name="KEYBRAKE_WORKFLOW_NAMESPACE", value="{{workflow.namespace}}"),
    EnvVar(name="KEYBRAKE_WORKFLOW_UID", value="{{workflow.uid}}"),
]


def issued_id(name: str, global_name: str) -> Parameter:
    """The output naming what the step issued, also a workflow-global output, which the exit
    handler revokes."""
    return Parameter(
        name=name, global_name=global_name, value_from=ValueFrom(path=f"{OUTPUT_DIR}/{name}")
    )


def issuing_step(
    name: str,
    proxy: ProxyConnection | None,
    *,
    inputs: Sequence[Parameter],
    outputs: Sequence[Parameter],
    env: Sequence[EnvVar] = (),
) -> Template:
    """The script template of an issuing step (`_step_issue.py`): `inputs`, then what every
    issuing step takes (a request id, the proxy, the cluster), each passed to the script as an
    environment variable; `env` besides, and the run's label and identity. `proxy`: the default
    connection if None."""
    proxy = proxy or ProxyConnection()
    inputs = [*inputs, *_issuing_inputs(proxy)]
    return script_step(
        name,
        step="issue",
        proxy=proxy,
        inputs=inputs,
        outputs=outputs,
        env=[*_input_env(inputs), *env, *_RUN_ENV],
        retry=default_retry_strategy(limit=2),
    )


def add_issuing_task(
    dag: DAG,
    workflow: Workflow,
    *,
    name: str,
    template: str,
    build: Callable[[str, ProxyConnection], Template],
    shared: str,
    templates: SharedTemplates | None,
    proxy: ProxyConnection,
    arguments: dict[str, str],
    depends: str | None = None,
) -> Task:
    """The issuing task `name` in the open `dag` (a name it has already is an error), calling
    `template`, which `build` makes and adds to `workflow`, or with `templates` the installed
    template `shared`. It passes `arguments`, then a request id that every retry of the step
    repeats (a retry then replaces what an earlier attempt issued), and the proxy's."""
    if any(getattr(task, "name", None) == name for task in dag.tasks):
        raise TemplateConfigError(f"the DAG already has a task named {name!r}; pass name=...")
    arguments = {
        **arguments,
        "request_id": f"{{{{workflow.uid}}}}/{name}",
        **proxy.step_arguments(cluster=True),
    }
    if templates is None:
        add_template(workflow, build(template, proxy))
        return Task(name=name, template=template, arguments=arguments, depends=depends)
    templates.check(proxy)
    return Task(name=name, template_ref=templates.ref(shared), arguments=arguments, depends=depends)


def money(value: Money | None, what: str) -> str:
    """The step argument for the dollar amount `what`: empty if None, an Argo expression as is."""
    if value is None:
        return ""
    if isinstance(value, str) and is_expression(value):
        return value
    if isinstance(value, bool | float):
        raise TemplateConfigError(
            f"{what} must be an int, Decimal or string such as '12.50', got {value!r}"
        )
    try:
        return usd(str(value), what)
    except InputError as exc:
        raise TemplateConfigError(str(exc)) from None


def duration(value: str) -> str:
    """The step argument for `expires_in`: a duration such as 2h, or an Argo expression."""
    if is_expression(value) or _DURATION.match(value):
        return value
    raise TemplateConfigError(f"expires_in must be a duration such as 30m, 2h or 7d, got {value!r}")


def constraints_argument(value: Constraints | None, vendor: str | None = None) -> str:
    """The step argument for `constraints`: empty if None, an Argo expression as is, else the
    JSON object, checked now as the proxy checks it (`vendor`: a key's, whose constraints must
    all be of its vendor; None for a budget's, or a vendor chosen at run time)."""
    if value is None:
        return ""
    if isinstance(value, str):
        if is_expression(value):
            return value
        raise TemplateConfigError(
            'constraints must be a mapping such as {"customers": ["cus_1"]} or a parameter '
            f"holding that JSON object, got the string {value!r}"
        )
    try:
        parse_constraints(value, vendor=vendor)
        return json.dumps(dict(value))
    except ValueError as exc:
        raise TemplateConfigError(str(exc)) from None
