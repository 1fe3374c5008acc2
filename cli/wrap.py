"""`keybrake wrap FILE`: convert an Argo workflow to the vault-key pattern (docs/wrap.md)."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated

import typer

from keybrake.cli._common import EXIT_USAGE, fail
from keybrake.cli._options import (
    ConstraintModeOption,
    constraint_option,
    constraints,
    expires_in_option,
    positive_dollars,
)


class WrapVendor(enum.StrEnum):
    """auto, or a vendor keybrake proxies, and no other (tests/test_vendor_facts.py)."""

    auto = "auto"
    stripe = "stripe"
    twilio = "twilio"
    resend = "resend"


def wrap(
    file: Annotated[Path, typer.Argument(help="The workflow's YAML file.", show_default=False)],
    budget_usd: Annotated[
        str,
        typer.Option("--budget-usd", help="What one run may spend in all, across its vendors."),
    ],
    vendor: Annotated[
        WrapVendor,
        typer.Option(
            help="The vendor of credentials whose names do not tell it (never one whose names "
            "say another vendor's)."
        ),
    ] = WrapVendor.auto,
    max_usd_per_pod: Annotated[
        str | None,
        typer.Option(
            "--max-usd-per-pod", help="What one fanned-out item may spend, retries included."
        ),
    ] = None,
    refusal_exit_code: Annotated[
        int | None,
        typer.Option(
            "--refusal-exit-code",
            min=1,
            max=255,
            help="The exit code the pods use when keybrake refuses a call: retries then skip it "
            "and still retry other failures (default: retry system errors only).",
        ),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", help="'METHOD /path' the keys may call; repeatable."),
    ] = None,
    expires_in: Annotated[
        str | None,
        expires_in_option(
            "How long the keys live, e.g. 6h (default: until the run ends, at most its "
            "activeDeadlineSeconds and the proxy's longest key life)."
        ),
    ] = None,
    constraint: Annotated[
        list[str] | None,
        constraint_option(
            "FIELD=VALUE[,VALUE...]: whom the run's calls may pay or message, e.g. "
            "customers=cus_1,cus_2; repeatable; set on the run's key (several vendors: its "
            "budget)."
        ),
    ] = None,
    constraint_mode: ConstraintModeOption = None,
    proxy_url: Annotated[
        str, typer.Option("--proxy-url", help="The keybrake proxy, as the pods reach it.")
    ] = "http://keybrake.keybrake.svc.cluster.local:8080",
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Lint settings (internal_secrets; default .keybrake-lint.yaml)."
        ),
    ] = None,
    namespaced: Annotated[
        bool,
        typer.Option(
            "--namespaced",
            help="Call keybrake-vault-key installed as a WorkflowTemplate in the workflow's "
            "namespace (templates/workflowtemplates/), not the ClusterWorkflowTemplate.",
        ),
    ] = False,
    inline: Annotated[
        bool,
        typer.Option(
            "--inline",
            help="Copy keybrake's issue and revoke steps into the workflow instead of calling "
            "the installed keybrake-vault-key by templateRef.",
        ),
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Rewrite FILE itself.")] = False,
    diff: Annotated[
        bool, typer.Option("--diff", help="Print a unified diff of the change instead.")
    ] = False,
) -> None:
    """Rewrite an Argo workflow into the vault-key pattern: a capped key issued first, pods
    given the key instead of the vendor Secret, safe retries, and the keys revoked on exit after
    the workflow's own exit handler. Says on stderr what each key may call, spend and how long
    it lives (warning when the endpoints are wrap's default ones), and the one code change each
    SDK needs.

    Example: keybrake wrap billing-agent.yaml --budget-usd 300 --max-usd-per-pod 20 --diff
    """
    from keybrake.adopt.wrap import WrapError, WrapOptions, wrap_text
    from keybrake.cli.lint import read_internal_secrets

    if in_place and output is not None:
        fail("--in-place and --output: choose one", EXIT_USAGE)
    budget = positive_dollars(budget_usd, "--budget-usd")
    assert budget is not None
    try:
        original = file.read_bytes().decode("utf-8")  # as it is: CRLF stays CRLF
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {exc}", EXIT_USAGE)
    options = WrapOptions(
        budget_usd=budget,
        vendor=vendor.value,
        max_usd_per_pod=positive_dollars(max_usd_per_pod, "--max-usd-per-pod"),
        refusal_exit_code=refusal_exit_code,
        allow=list(allow or []),
        proxy_url=proxy_url,
        inline=inline,
        namespaced=namespaced,
        internal_secrets=read_internal_secrets(config, [file.parent]),
        expires_in=expires_in,
        constraints=constraints(constraint, constraint_mode),
    )
    try:
        wrapped = wrap_text(original, options, file)
    except WrapError as exc:
        fail(f"cannot wrap {file}: {exc}", EXIT_USAGE)
    for line in wrapped.keys:
        print(f"keybrake wrap: {line}", file=sys.stderr)
    for warning in wrapped.warnings:
        print(f"keybrake wrap: warning: {warning}", file=sys.stderr)
    for note in wrapped.notes:
        print(f"keybrake wrap: {note}", file=sys.stderr)
    if not wrapped.changed:
        print(f"keybrake wrap: {file}: nothing to change", file=sys.stderr)
    try:
        if diff:
            sys.stdout.write(wrapped.diff(original, str(file)))
        elif in_place:
            if wrapped.changed:
                file.write_bytes(wrapped.text.encode("utf-8"))
        elif output is not None:
            output.write_bytes(wrapped.text.encode("utf-8"))
        else:
            sys.stdout.write(wrapped.text)
    except OSError as exc:
        fail(f"cannot write: {exc}", EXIT_USAGE)
