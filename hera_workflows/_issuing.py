"""What every issuing step (the issue-vault-key and issue-budget steps) shares: the inputs and
environment naming the run, and the checks of dollar amounts and durations.

A module of its own so that `budget` and `issue` both import it, never each other's helpers:
`issue` imports `budget` (a key may draw on a run budget), so `budget` must not import `issue`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from hera.workflows.models import EnvVar, Parameter

from .connection import ProxyConnection, is_expression
from .errors import TemplateConfigError

__all__ = [
    "RUN_LABEL",
    "Money",
    "duration",
    "given",
    "issuing_inputs",
    "money",
    "optional",
    "run_env",
]

RUN_LABEL = "argo/{{workflow.name}}"

Money = int | Decimal | str
_DURATION = re.compile(r"^[1-9][0-9]*[smhd]$")


def given(parameter: str) -> str:
    """The value of the template's input `parameter`."""
    return f"{{{{inputs.parameters.{parameter}}}}}"


def optional(name: str, description: str) -> Parameter:
    """An input that may be left empty (not set)."""
    return Parameter(name=name, default="", description=f"{description}; empty: none")


def issuing_inputs(proxy: ProxyConnection) -> list[Parameter]:
    """The inputs every issuing step (a key, a budget) takes besides what it issues."""
    return [
        Parameter(name="proxy_url", default=proxy.url, description="the keybrake proxy"),
        Parameter(
            name="cluster",
            default=proxy.cluster,
            description="this cluster's name, recorded with the key (for keybrake reaper)",
        ),
    ]


def run_env() -> list[EnvVar]:
    """The run's cluster, label and identity, which the proxy records with what it issues
    (with an issuing step's `issuing_inputs`)."""
    return [
        EnvVar(name="KEYBRAKE_CLUSTER", value=given("cluster")),
        EnvVar(name="KEYBRAKE_LABEL", value=RUN_LABEL),
        EnvVar(name="KEYBRAKE_WORKFLOW_NAME", value="{{workflow.name}}"),
        EnvVar(name="KEYBRAKE_WORKFLOW_NAMESPACE", value="{{workflow.namespace}}"),
        EnvVar(name="KEYBRAKE_WORKFLOW_UID", value="{{workflow.uid}}"),
    ]


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
        amount = Decimal(str(value))
    except InvalidOperation:
        raise TemplateConfigError(
            f"{what} must be a dollar amount such as 300 or '12.50', got {value!r}"
        ) from None
    if not amount.is_finite() or amount <= 0:
        raise TemplateConfigError(f"{what} must be a positive dollar amount, got {value!r}")
    return str(amount)


def duration(value: str) -> str:
    """The step argument for `expires_in`: a duration such as 2h, or an Argo expression."""
    if is_expression(value) or _DURATION.match(value):
        return value
    raise TemplateConfigError(f"expires_in must be a duration such as 30m, 2h or 7d, got {value!r}")
