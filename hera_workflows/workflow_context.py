"""Where a building block is being used: the `with Workflow(...)` and `with DAG(...)` blocks.

Hera 7.1 keeps the open `with` blocks in a private context (`hera.workflows._context`); this is
the only module that reads it. Templates are added to the workflow here, by name, exactly once:
adding a different template under a name already taken is an error instead of a silent clash.
See <https://hera.readthedocs.io/en/stable/user-guides/core-concepts/>.
"""

from __future__ import annotations

from typing import Any

from hera.workflows import DAG, Workflow
from hera.workflows._context import _context
from hera.workflows.models import Template

from .errors import TemplateConfigError

__all__ = ["add_template", "current_dag", "current_workflow"]


def current_workflow(what: str) -> Workflow:
    pieces: list[Any] = list(_context.pieces or [])
    if not pieces or not isinstance(pieces[0], Workflow):
        raise TemplateConfigError(f"{what} must be called inside `with Workflow(...)`")
    return pieces[0]


def current_dag(what: str) -> DAG:
    pieces: list[Any] = list(_context.pieces or [])
    if not pieces or not isinstance(pieces[-1], DAG):
        raise TemplateConfigError(
            f"{what} must be called inside `with DAG(...)` within a `with Workflow(...)` block"
        )
    current_workflow(what)
    return pieces[-1]


def _as_dict(template: Any) -> Any:
    model = template if isinstance(template, Template) else template._build_template()
    return model.model_dump(exclude_none=True, by_alias=True)


def add_template(workflow: Workflow, template: Template) -> None:
    """Add `template` to `workflow` unless an identical one is there; a clash is an error."""
    for existing in workflow.templates:
        if getattr(existing, "name", None) == template.name:
            if _as_dict(existing) == _as_dict(template):
                return
            raise TemplateConfigError(
                f"the workflow already has a different template named {template.name!r}; "
                "pass another name= to the keybrake building block"
            )
    workflow.templates.append(template)
