"""`keybrake templates`: render the Argo templates from the Hera Python (owned by the Hera work)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Render the Argo WorkflowTemplates shipped in templates/.", no_args_is_help=True
)


@app.command()
def render(
    check: bool = typer.Option(False, "--check", help="Fail if templates/ is stale."),
) -> None:
    """Render templates/ from keybrake.hera_workflows (placeholder until the Hera library lands)."""
    raise typer.Exit(0)
