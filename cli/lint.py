"""`keybrake lint PATH...`: the spend risks in Argo workflow files (docs/lint.md)."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated

import typer

from keybrake.cli._common import EXIT_USAGE, fail
from keybrake.cli._options import positive_dollars

CONFIG_FILE = ".keybrake-lint.yaml"


class LintOutput(enum.StrEnum):
    text = "text"
    json = "json"
    sarif = "sarif"


class FailOn(enum.StrEnum):
    high = "high"
    medium = "medium"
    low = "low"
    never = "never"


def read_internal_secrets(config: Path | None, paths: list[Path]) -> set[str]:
    """`internal_secrets:` of the config file: --config, else .keybrake-lint.yaml in the current
    folder or the first folder linted."""
    import yaml

    from keybrake.adopt.yaml_bound import TooManyAliasNodes, safe_load

    candidates = (
        [config] if config else [Path(CONFIG_FILE)] + [p / CONFIG_FILE for p in paths if p.is_dir()]
    )
    for candidate in candidates:
        if candidate is None or not candidate.is_file():
            if config is not None:
                fail(f"--config {config}: no such file", EXIT_USAGE)
            continue
        try:
            data = safe_load(candidate.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError, TooManyAliasNodes) as exc:
            fail(f"{candidate}: not a readable YAML file: {exc}", EXIT_USAGE)
        names = data.get("internal_secrets", []) if isinstance(data, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            fail(f"{candidate}: internal_secrets must be a list of Secret names", EXIT_USAGE)
        return set(names)
    return set()


def lint(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders of YAML.", show_default=False)
    ],
    output: Annotated[
        LintOutput, typer.Option("--output", "-o", help="text, json or sarif (SARIF 2.1.0).")
    ] = LintOutput.text,
    fail_on: Annotated[
        FailOn,
        typer.Option("--fail-on", help="Exit 1 when a finding is at least this severe."),
    ] = FailOn.medium,
    config: Annotated[
        Path | None,
        typer.Option("--config", help=f"Settings file (default: {CONFIG_FILE} if present)."),
    ] = None,
    diff: Annotated[
        bool,
        typer.Option(
            "--diff",
            help="After the findings, the change `keybrake wrap` would make to each file with "
            "vendor credentials (or why it cannot); needs --budget-usd.",
        ),
    ] = False,
    budget_usd: Annotated[
        str | None, typer.Option("--budget-usd", help="With --diff: the run budget to show.")
    ] = None,
) -> None:
    """Find the spend risks in Argo workflows: vendor keys in pods, retries that repeat charges,
    no cap, no revoke on exit, unbounded fan-out, vault keys in parameters. Exit 0: nothing at
    or above --fail-on; 1: findings; 2: a path could not be read.

    Example: keybrake lint workflows/ -o sarif > keybrake.sarif
    """
    from importlib.metadata import PackageNotFoundError, version

    from keybrake.adopt.lint import lint_paths
    from keybrake.adopt.report import as_json, as_sarif, as_text

    if diff and (budget_usd is None or output is not LintOutput.text):
        fail("--diff needs --budget-usd, and text output", EXIT_USAGE)
    internal = read_internal_secrets(config, paths)
    report = lint_paths(paths, internal)
    if output is LintOutput.json:
        sys.stdout.write(as_json(report))
    elif output is LintOutput.sarif:
        try:
            tool_version = version("keybrake")
        except PackageNotFoundError:
            tool_version = "0"
        sys.stdout.write(as_sarif(report, tool_version))
    else:
        sys.stdout.write(as_text(report))
    if diff:
        _show_wrap_diffs(report, internal, budget_usd or "")
    if report.unreadable:
        raise typer.Exit(2)
    if report.at_or_above(fail_on.value):
        raise typer.Exit(1)


def _show_wrap_diffs(report: object, internal: set[str], budget_usd: str) -> None:
    """What `keybrake wrap --budget-usd ...` would change in each file with a KB101 finding."""
    from keybrake.adopt.lint import Report
    from keybrake.adopt.wrap import WrapError, WrapOptions, wrap_text

    assert isinstance(report, Report)
    budget = positive_dollars(budget_usd, "--budget-usd")
    assert budget is not None
    options = WrapOptions(budget_usd=budget, internal_secrets=internal)
    for path in sorted({f.path for f in report.findings if f.rule == "KB101"}):
        original = path.read_text(encoding="utf-8")
        try:
            wrapped = wrap_text(original, options, path)
        except WrapError as exc:
            sys.stdout.write(f"# keybrake wrap {path}: cannot convert: {exc}\n")
            continue
        sys.stdout.write(wrapped.diff(original, str(path)))
