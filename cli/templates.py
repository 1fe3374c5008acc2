"""`keybrake templates`: render templates/ from keybrake.hera_workflows, or check it is current.

A thin adapter: the rendering and the comparison live in `keybrake.hera_workflows.render`; this
module parses the flags, prints with rich and chooses the exit code (0 done or up to date, 1 stale
with --check, 2 the folder cannot be read or written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["app"]

app = typer.Typer(
    help="Render the Argo WorkflowTemplates shipped in templates/.",
    no_args_is_help=True,
)

EXIT_STALE = 1
EXIT_IO = 2

_EPILOG = (  # \b: these lines as they are written (click's mark)
    "Examples:\n\n\b\n"
    "keybrake templates render                 # rewrite templates/ from the Python\n"
    "keybrake templates render --check         # CI: exit 1 listing stale files\n"
    "keybrake templates render --out /tmp/tpl  # render elsewhere"
)


def _fail(console: Console, message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(EXIT_IO)


@app.command(epilog=_EPILOG)
def render(
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 and list the files that differ.")
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder to render into.")] = Path("templates"),
) -> None:
    """Render templates/ (WorkflowTemplates, ClusterWorkflowTemplates, examples) from the Python.

    Output is deterministic; only files with the "generated" header are written or removed.
    """
    # Hera (half a second to import) only for the commands that render.
    from keybrake.hera_workflows.errors import TemplateConfigError
    from keybrake.hera_workflows.render import compare, rendered_files, write

    stdout, stderr = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    shown = escape(f"{out.as_posix().rstrip('/')}/")
    if out.exists() and not out.is_dir():
        raise _fail(stderr, f"{escape(str(out))} is a file, not a folder; pass --out with a folder")
    try:
        files = rendered_files()
    except (ImportError, TemplateConfigError) as exc:  # a broken install or example
        raise _fail(stderr, f"cannot render the templates: {escape(str(exc))}") from None
    if check:
        if not out.is_dir():
            raise _fail(
                stderr,
                f"{shown} does not exist; run from the repository root or pass --out",
            )
        try:
            found = compare(out, files)
        except OSError as exc:
            raise _fail(stderr, f"cannot read {shown}: {escape(str(exc))}") from None
        if not found.stale:
            stdout.print(f"{shown} is up to date ({len(files)} files).")
            return
        stderr.print(f"[red]{shown} is stale[/red] — it differs from keybrake.hera_workflows:")
        for label, paths in (
            ("changed", found.changed),
            ("missing", found.missing),
            ("orphaned", found.orphaned),
        ):
            for path in paths:
                stderr.print(f"  {label:<9}{escape(out.joinpath(path).as_posix())}")
        stderr.print("Run `keybrake templates render` and commit the result.")
        raise typer.Exit(EXIT_STALE)
    try:
        found = write(out, files)
    except OSError as exc:
        raise _fail(stderr, f"cannot write {shown}: {escape(str(exc))}") from None
    for label, paths in (("wrote", found.changed + found.missing), ("removed", found.orphaned)):
        for path in paths:
            stdout.print(f"  {label:<8}{escape(out.joinpath(path).as_posix())}")
    written = len(found.changed) + len(found.missing)
    stdout.print(
        f"{shown}: {written} written, {len(found.orphaned)} removed, "
        f"{len(found.up_to_date)} unchanged."
    )
