"""`keybrake issuers`: scoped issuer tokens and Kubernetes bindings, instead of the admin token in
workflow namespaces. Managing issuers needs the admin token."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from keybrake.cli import _options as options
from keybrake.cli._common import (
    EXIT_USAGE,
    Output,
    OutputOption,
    console,
    default_output,
    err_console,
    fail,
    print_created,
    print_data,
    print_item,
)
from keybrake.cli._connection import ApiKeyOption, UrlOption, ask_proxy
from keybrake.cli._paging import ListOutputOption, print_listing
from keybrake.cli._render import constraints_text, detail_table
from keybrake.cli._table import Grid
from keybrake.proxy.client import DEFAULT_URL
from keybrake.proxy.models import (
    IssuerCreate,
    IssuerInfo,
    KubernetesBinding,
)

app = typer.Typer(
    help="Create, list, show and delete issuers: tokens (or Kubernetes service accounts) that "
    "may issue keys within a policy, and see only their own labels.",
    no_args_is_help=True,
)

IssuerIdArgument = Annotated[str, options.id_argument("issuer", "The issuer id (is_...).")]


def _labels(issuer: IssuerInfo) -> str:
    """The labels it issues and sees: those starting with its prefix."""
    return f"{issuer.label_prefix}*"


def _policy(issuer: IssuerInfo) -> Grid:
    binding = issuer.kubernetes
    rows = [
        ("issuer", f"{issuer.issuer_id} ({issuer.name}), {issuer.status}"),
        ("labels", _labels(issuer)),
        ("vendors", ", ".join(issuer.allowed_vendors) or "any"),
        ("endpoints", ", ".join(issuer.allowed_endpoints) or "any"),
        ("max 24h cap", f"${issuer.max_daily_usd_cap}" if issuer.max_daily_usd_cap else "none"),
        ("max total cap", f"${issuer.max_total_usd_cap}" if issuer.max_total_usd_cap else "none"),
        ("max life", issuer.max_expires_in or "the proxy's"),
        ("max active keys", str(issuer.max_active_keys or "no limit")),
        ("may issue", "yes" if issuer.may_issue else "no (read and revoke only)"),
        ("constraints", constraints_text(issuer.constraints, none="none")),
        (
            "kubernetes",
            f"{', '.join(binding.service_accounts)} in {', '.join(binding.namespaces)} "
            f"(audience {binding.audience})"
            if binding
            else "none",
        ),
        ("static token", "yes" if issuer.static_token else "no"),
        ("created", issuer.created_at),
    ]
    return detail_table(rows)


@app.command(
    "create",
    epilog="Example: keybrake issuers create --name payments --label-prefix argo/payments- "
    "--vendor stripe --allow 'POST /v1/payment_intents' --max-total-usd-cap 500 "
    "--max-expires-in 6h --k8s-namespace payments --k8s-service-account keybrake-issuer",
)
def create(
    name: Annotated[str, typer.Option(help="A short name, e.g. the team's.")],
    label_prefix: Annotated[
        str,
        typer.Option("--label-prefix", help="The labels it issues and sees, e.g. argo/payments-."),
    ],
    vendor: Annotated[
        list[str] | None, typer.Option("--vendor", help="A vendor it may issue for; repeatable.")
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", help="'METHOD /path' its keys' endpoints must lie within."),
    ] = None,
    max_daily_usd_cap: Annotated[
        str | None, typer.Option("--max-daily-usd-cap", help="Most a key may spend in 24 hours.")
    ] = None,
    max_total_usd_cap: Annotated[
        str | None, typer.Option("--max-total-usd-cap", help="Most a key may spend in all.")
    ] = None,
    max_expires_in: Annotated[
        str | None, typer.Option("--max-expires-in", help="Longest life, e.g. 6h.")
    ] = None,
    max_active_keys: Annotated[
        int | None, typer.Option("--max-active-keys", min=1, help="Active keys at once.")
    ] = None,
    revoke_only: Annotated[
        bool,
        typer.Option(
            "--revoke-only", help="It may read and revoke within its scope, never issue (reaper)."
        ),
    ] = False,
    k8s_namespace: Annotated[
        list[str] | None,
        typer.Option("--k8s-namespace", help="Bind service accounts of this namespace."),
    ] = None,
    k8s_service_account: Annotated[
        list[str] | None,
        typer.Option("--k8s-service-account", help="A service-account name, or * for any."),
    ] = None,
    audience: Annotated[
        str, typer.Option("--audience", help="The projected token's audience.")
    ] = "keybrake",
    static_token: Annotated[
        bool | None,
        typer.Option(
            "--static-token/--no-static-token",
            help="Make a token (default: only without a Kubernetes binding).",
        ),
    ] = None,
    constraint: options.ConstraintOption = None,
    constraint_mode: options.ConstraintModeOption = None,
    quiet: Annotated[bool, options.quiet_option("Print only the token.")] = False,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Create an issuer. Its token is shown once: store it as the Secret the issue steps read,
    or bind Kubernetes service accounts instead and store nothing."""
    binding = None
    if bool(k8s_namespace) != bool(k8s_service_account):
        fail("--k8s-namespace and --k8s-service-account go together", EXIT_USAGE)
    with options.usage_on_invalid():
        if k8s_namespace and k8s_service_account:
            binding = KubernetesBinding(
                namespaces=k8s_namespace, service_accounts=k8s_service_account, audience=audience
            )
        spec = IssuerCreate(
            name=name,
            label_prefix=label_prefix,
            allowed_vendors=vendor or [],
            allowed_endpoints=allow or [],
            max_daily_usd_cap=options.dollars(max_daily_usd_cap, "--max-daily-usd-cap"),
            max_total_usd_cap=options.dollars(max_total_usd_cap, "--max-total-usd-cap"),
            max_expires_in=max_expires_in,
            max_active_keys=max_active_keys,
            may_issue=not revoke_only,
            kubernetes=binding,
            static_token=static_token,
            constraints=options.constraints(constraint, constraint_mode),
        )
    issued = ask_proxy(url, api_key, lambda client: client.create_issuer(spec))
    for warning in issued.warnings:  # on stderr, whatever the output: stdout stays parseable
        err_console().print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    info = IssuerInfo.model_validate(issued.model_dump(exclude={"issuer_token"}))
    shown = print_created(
        info,
        output,
        _policy,
        quiet=quiet,
        handle=issued.issuer_token or issued.issuer_id,
        extra={"issuer_token": issued.issuer_token},
    )
    if shown is Output.table:
        if issued.issuer_token:
            console().print(f"token (shown once): {issued.issuer_token}", soft_wrap=True)
        else:
            console().print("no static token: the bound service accounts log in with theirs")


@app.command("list", epilog="Example: keybrake issuers list --all")
def list_issuers(
    include_deleted: Annotated[bool, typer.Option("--all", help="Deleted ones too.")] = False,
    output: ListOutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """List issuers and their policies."""
    issuers = ask_proxy(
        url, api_key, lambda client: client.list_issuers(include_deleted=include_deleted)
    )
    print_listing(issuers, output, "issuer_id", _issuers_table, empty="No issuers.")


def _issuers_table(issuers: list[IssuerInfo], _wide: bool = False) -> Grid:
    table = Grid.of("ISSUER ID,NAME,STATUS,LABELS,VENDORS,MAX TOTAL,KUBERNETES", "MAX TOTAL")
    for issuer in issuers:
        binding = issuer.kubernetes
        table.rows.append(
            [
                issuer.issuer_id,
                issuer.name,
                issuer.status,
                _labels(issuer),
                ", ".join(issuer.allowed_vendors) or "any",
                f"${issuer.max_total_usd_cap}" if issuer.max_total_usd_cap else "-",
                f"{','.join(binding.namespaces)}/{','.join(binding.service_accounts)}"
                if binding
                else "-",
            ]
        )
    return table


@app.command("show", epilog="Example: keybrake issuers show is_3f9c2a1b4d5e6f70")
def show(
    issuer_id: IssuerIdArgument,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Show one issuer's policy and binding."""
    issuer = ask_proxy(url, api_key, lambda client: client.get_issuer(issuer_id))
    print_item(issuer, output, _policy)


@app.command("delete", epilog="Example: keybrake issuers delete is_3f9c2a1b4d5e6f70 --revoke")
def delete(
    issuer_id: IssuerIdArgument,
    revoke: Annotated[
        bool, typer.Option("--revoke", help="Also revoke every live key and budget it issued.")
    ] = False,
    output: OutputOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Delete an issuer: its token (and bindings) stop at once. Its keys live on until revoked
    or expired, unless --revoke."""
    result = ask_proxy(url, api_key, lambda client: client.delete_issuer(issuer_id, revoke=revoke))
    chosen = default_output(output)
    if chosen is not Output.table:
        print_data(result, chosen)
        return
    keys, budgets = result.get("revoked_keys") or [], result.get("revoked_budgets") or []
    revoked = f"; revoked {len(keys)} key(s) and {len(budgets)} budget(s)" if revoke else ""
    console().print(f"deleted issuer {issuer_id}{revoked}", soft_wrap=True)
