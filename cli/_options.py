"""Options several commands share, and their parsing: dollar amounts, metadata pairs, cap
changes, statuses, vendors, ids."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from keybrake.cli._common import EXIT_USAGE, choice, fail
from keybrake.proxy.constraints import MODES, RATE, VENDOR_FIELDS
from keybrake.proxy.models import CapsPatch, describe_validation_error
from keybrake.proxy.vendor_facts import VENDOR_NAMES

__all__ = [
    "AlertAtOption",
    "ConstraintModeOption",
    "ConstraintOption",
    "DailyCapOption",
    "LabelOption",
    "NewConstraintOption",
    "NewDailyCapOption",
    "NewExpiresInOption",
    "NewTotalCapOption",
    "NoConstraintsOption",
    "ReasonOption",
    "TotalCapOption",
    "caps_patch",
    "constraint_option",
    "constraints",
    "dollars",
    "expires_in_option",
    "id_argument",
    "label_filter",
    "meta_option",
    "metadata",
    "quiet_option",
    "status_option",
    "total_cap_option",
    "usage_on_invalid",
    "vendor_option",
    "workflow_filter",
]

# Issuing a key or creating a budget.
LabelOption = Annotated[str, typer.Option(help="Usually argo/<workflow name>.")]
DailyCapOption = Annotated[
    str | None, typer.Option("--daily-usd-cap", help="Dollars in any 24 hours.")
]


def total_cap_option(help: str) -> Any:
    """`--total-usd-cap`: dollars over a key's or a budget's whole life (`dollars` reads it)."""
    return typer.Option("--total-usd-cap", help=help)


TotalCapOption = Annotated[str | None, total_cap_option("Dollars over its whole life.")]
NewTotalCapOption = Annotated[str | None, total_cap_option("New cap over its whole life.")]


def meta_option(help: str) -> Any:
    """`--meta key=value`, repeatable: metadata stored with what is made (`metadata` reads it)."""
    return typer.Option("--meta", help=help)


def expires_in_option(help: str) -> Any:
    """`--expires-in`: how long what is made lives, from now (90s, 30m, 2h, 7d)."""
    return typer.Option("--expires-in", help=help)


def quiet_option(help: str) -> Any:
    """`--quiet` / `-q` of a command that makes something: print only what a script needs of it."""
    return typer.Option("--quiet", "-q", help=help)


# Patching a key or a budget.
ReasonOption = Annotated[str, typer.Option("--reason", help="Why: recorded with the change.")]
NewDailyCapOption = Annotated[
    str | None, typer.Option("--daily-usd-cap", help="New cap for any 24 hours.")
]
NewExpiresInOption = Annotated[
    str | None, expires_in_option("New life, from now (never past the longest allowed).")
]


def dollars(text: str | None, flag: str) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        fail(f"{flag} {text!r}: not a dollar amount", EXIT_USAGE)


def positive_dollars(text: str | None, flag: str) -> Decimal | None:
    """A dollar amount that must be a positive, finite number (a budget, a cap)."""
    value = dollars(text, flag)
    if value is not None and (not value.is_finite() or value <= 0):
        fail(f"{flag} {text!r}: must be a positive dollar amount", EXIT_USAGE)
    if value is not None and value > 10**9:
        fail(f"{flag} {text!r}: more than a billion dollars is no cap", EXIT_USAGE)
    return value


def percents(text: str | None) -> list[int] | None:
    """--alert-at: "25,90" (percents of the caps), "none" (no threshold alerts: a key still
    alerts on its first cap hit), or unset (the proxy's KEYBRAKE_ALERT_THRESHOLDS)."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        fail(f"--alert-at {text!r}: percents separated by commas, e.g. 50,90, or none", EXIT_USAGE)


AlertAtOption = Annotated[
    str | None,
    typer.Option(
        "--alert-at",
        help="Percents of its caps at which the proxy's webhook alerts, e.g. 50,90; none: no "
        "threshold alerts (a key still alerts on its first cap hit; a budget alerts on none). "
        "Default: the proxy's KEYBRAKE_ALERT_THRESHOLDS.",
    ),
]


def metadata(items: list[str] | None) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail(f"--meta {item!r}: expected key=value", EXIT_USAGE)
        meta[name] = value
    return meta


# Constraints on what a key, a budget or an issuer's keys and budgets may pay or message.
_FIELDS_HELP = (
    "; ".join(f"{vendor}: {', '.join(names)}" for vendor, names in VENDOR_FIELDS.items())
    + f"; any vendor: {RATE}=N (calls at the vendor in any 60 seconds)"
)


def constraint_option(help: str) -> Any:
    """`--constraint FIELD=VALUE[,VALUE...]`, repeatable (`constraints` reads it); `help` says
    whose, the fields each vendor has follow."""
    return typer.Option(
        "--constraint", metavar="FIELD=VALUES", help=f"{help} Fields: {_FIELDS_HELP}."
    )


# On what issues a key or budget (keys issue, budgets create, issuers create): the constraints
# it is held to (an issuer's bound what it issues).
ConstraintOption = Annotated[
    list[str] | None,
    constraint_option(
        "FIELD=VALUE[,VALUE...]: whom its calls may pay or message, e.g. customers=cus_1,cus_2, "
        "or how fast (max_calls_per_minute=60); repeatable."
    ),
]

# On what patches a key or budget (keys patch, budgets patch): its constraints, replaced whole.
NewConstraintOption = Annotated[
    list[str] | None,
    constraint_option(
        "FIELD=VALUE[,VALUE...]: the constraints it is held to from the next call on, replacing "
        "its own as a whole (as at issue; --constraint-mode too); repeatable."
    ),
]
NoConstraintsOption = Annotated[
    bool,
    typer.Option(
        "--no-constraints",
        help="Remove its own constraints (under an issuer with constraints, it then holds the "
        "issuer's).",
    ),
]

ConstraintModeOption = Annotated[
    str | None,
    choice(
        "--constraint-mode",
        values=MODES,
        help="enforce (the default): refuse a call outside the constraints; report: forward it "
        "and audit it as a would-be refusal.",
    ),
]


def constraints(items: list[str] | None, mode: str | None) -> dict[str, Any] | None:
    """--constraint FIELD=VALUE[,VALUE...] (repeatable; a field given twice has the values of
    both) and --constraint-mode, as the API's `constraints` (which checks the values)."""
    if not items:
        if mode is not None:
            fail(
                "--constraint-mode: give the constraints too (--constraint FIELD=VALUE)", EXIT_USAGE
            )
        return None
    found: dict[str, Any] = {} if mode is None else {"mode": mode}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not name:
            fail(
                f"--constraint {item!r}: expected FIELD=VALUE[,VALUE...], e.g. "
                "customers=cus_1,cus_2",
                EXIT_USAGE,
            )
        if name == "mode":
            fail("--constraint mode=...: give the mode as --constraint-mode", EXIT_USAGE)
        if name == RATE:
            if not re.fullmatch(r"[0-9]{1,7}", values.strip()):
                fail(f"--constraint {RATE}=N: a whole number of calls, e.g. {RATE}=60", EXIT_USAGE)
            found[RATE] = int(values.strip())
            continue
        found.setdefault(name, []).extend(value.strip() for value in values.split(","))
    return found


@contextmanager
def usage_on_invalid() -> Iterator[None]:
    """Around building a request from options: what the model refuses is a one-line usage error
    naming the field (exit 2), before anything is sent."""
    try:
        yield
    except ValidationError as exc:
        fail(describe_validation_error(exc), EXIT_USAGE)


def caps_patch(
    *,
    reason: str,
    daily_usd_cap: str | None,
    total_usd_cap: str | None,
    expires_in: str | None,
    max_usd_per_caller: str | None = None,
    constraint: list[str] | None = None,
    constraint_mode: str | None = None,
    no_constraints: bool = False,
) -> CapsPatch:
    given = constraints(constraint, constraint_mode)
    if no_constraints and given is not None:
        fail("--no-constraints: give it or --constraint, not both", EXIT_USAGE)
    with usage_on_invalid():
        return CapsPatch(
            reason=reason,
            daily_usd_cap=dollars(daily_usd_cap, "--daily-usd-cap"),
            total_usd_cap=dollars(total_usd_cap, "--total-usd-cap"),
            max_usd_per_caller=dollars(max_usd_per_caller, "--max-usd-per-caller"),
            expires_in=expires_in,
            constraints={} if no_constraints else given,  # ({}: none of its own)
        )


# What a key or a budget can be, as the admin API's `status` filter takes it (the API's own list
# is private to its module, which a listing should not have to import: tests/test_cli_output.py
# keeps the two the same).
STATUSES = ("active", "revoked", "expired")


def status_option(help: str) -> Any:
    """`--status` of a listing: one of STATUSES."""
    return choice("--status", values=STATUSES, help=help)


def vendor_option(help: str) -> Any:
    """`--vendor` of a listing: a vendor keybrake knows."""
    return choice("--vendor", values=VENDOR_NAMES, help=help)


_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def id_argument(kind: str, help: str) -> Any:
    """An id argument (`vk_...`), which also takes the name `-o name` prints (`key/vk_...`).
    Anything but an id's characters is refused here: the id becomes part of the request's path,
    where `key/` (empty) or `../budgets` would ask the proxy something else."""

    def parse(text: str) -> str:
        found = text.removeprefix(f"{kind}/")
        if not _ID.fullmatch(found):
            raise typer.BadParameter(f"{text!r} is not a {kind} id (letters, digits, _ and -)")
        return found

    return typer.Argument(help=help, parser=parse)


def label_filter(plural: str) -> Any:
    """`--label` of a listing of keys or budgets."""
    return typer.Option(help=f"Only {plural} with this label.")


def workflow_filter(plural: str) -> Any:
    """`--workflow` / `-w` of a listing of keys or budgets (`workflow_label` reads it)."""
    return typer.Option(
        "--workflow", "-w", help=f"Only {plural} of this Argo workflow (NAME or argo/NAME)."
    )


def workflow_label(workflow: str) -> str:
    """`--workflow` takes the workflow's name, or its label as the LABEL column shows it."""
    return workflow if workflow.startswith("argo/") else f"argo/{workflow}"
