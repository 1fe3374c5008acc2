"""What the CLI prints, read as kubectl's is: piped (`| cat`), every listing a row a line with
every column and every cell whole, whatever COLUMNS says; at an 80-column terminal no word split
and no column dropped; `-o name` as `key/vk_...`; help with every option and default whole and no
type placeholders; an unknown filter value a usage error naming the valid ones.

Commands run in-process: piped through tests/test_cli.py's runner, and "at a terminal" with their
stdout on a pseudo-terminal (`at_terminal`), as a shell gives it. Where the process is the point
(COLUMNS as it was when the CLI was imported): tests/e2e/test_cli_output_processes.py.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pty
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from unittest import mock

import httpx
import pytest
import typer.main
from rich.console import Console

from keybrake.cli._common import Output
from keybrake.cli._options import STATUSES
from keybrake.cli._paging import ListOutput
from keybrake.cli._table import Grid, print_grid
from keybrake.cli.audit import AuditOutput
from keybrake.cli.events import ACTIONS
from keybrake.cli.main import app
from keybrake.proxy.vendor_facts import VENDOR_NAMES
from tests.fakes.server import free_port
from tests.fakes.stripe_upstream import FakeStripe
from tests.fakes.webhook import WebhookReceiver
from tests.proxyproc import ADMIN_KEY
from tests.served import ServedProxy, serve_proxy
from tests.test_cli import runner

ROOT = Path(__file__).resolve().parent.parent
COMMAND = typer.main.get_command(app)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Values long enough to be split or cut where a table is squeezed.
LONG_LABEL = "argo/a-much-longer-workflow-name-nightly-report-builder-2024"
LONG_PREFIX = "argo/payments-team-very-long-prefix-for-nightly-"
LONG_PATH = "/v1/customers/cus_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/sources/src_0123456789abcdef"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProxy]:
    """A proxy holding something for every listing: keys (one on a budget), an issuer, audit rows
    (one of a long refused path), admin events, and alerts its webhook did not take."""
    stripe, hook = FakeStripe(), WebhookReceiver()
    hook.down = True
    served = serve_proxy(
        tmp_path_factory.mktemp("cli-output"),
        stripe_base=stripe.url,
        extra_env={
            "KEYBRAKE_ALERT_WEBHOOK_URL": hook.url,
            "KEYBRAKE_ALERT_THRESHOLDS": "1,50",
            "KEYBRAKE_ALERT_INTERVAL": "0.2",
        },
    )
    try:
        with served.admin() as admin:
            budget = admin.post(
                "/vault/budgets",
                json={
                    "agent_run_label": "argo/billing-agent-x7k2p",
                    "total_usd_cap": 500,
                    "daily_usd_cap": 300,
                    "expires_in": "6h",
                },
            ).json()
            admin.post(
                "/vault/issuers",
                json={
                    "name": "payments",
                    "label_prefix": LONG_PREFIX,
                    "allowed_vendors": ["stripe"],
                    "max_total_usd_cap": 500,
                },
            ).raise_for_status()
        for label, budget_id in (
            ("argo/billing-agent-x7k2p", budget["budget_id"]),
            (LONG_LABEL, None),
        ):
            key = served.issue(
                agent_run_label=label,
                daily_usd_cap=150,
                total_usd_cap=1000,
                budget_id=budget_id,
                allowed_endpoints=["POST /v1/payment_intents", "GET /v1/customers/*/sources/*"],
            )
            with httpx.Client(base_url=served.url + "/stripe") as vendor:
                for n in range(2):  # $50 each of a $150 cap: alerts at 1 % and 50 %
                    vendor.post(
                        "/v1/payment_intents",
                        data={"amount": 5000, "currency": "usd", "metadata[n]": str(n)},
                        headers={"Authorization": f"Bearer {key['vault_key']}.pod-runner-12345"},
                    ).raise_for_status()
                denied = vendor.get(
                    LONG_PATH + "/x", headers={"Authorization": f"Bearer {key['vault_key']}"}
                )
                assert denied.status_code == 403
        deadline = time.monotonic() + 20
        with served.admin() as admin:
            while not admin.get("/vault/alerts").json()["data"]:
                assert time.monotonic() < deadline, "no alert raised within 20 s"
                time.sleep(0.02)  # polling the outbox the proxy's scan fills
        yield served
    finally:
        served.stop()
        stripe.release()
        stripe.stop()
        hook.stop()


def piped(proxy: ServedProxy | None, *args: str, columns: int = 80) -> tuple[int, str, str]:
    """`keybrake ARGS | cat` in a terminal COLUMNS wide."""
    env = {
        "KEYBRAKE_URL": proxy.url if proxy else f"http://127.0.0.1:{free_port()}",
        "KEYBRAKE_API_KEY": ADMIN_KEY,
        "COLUMNS": str(columns),
    }
    result = runner.invoke(app, list(args), env=env)
    assert "Traceback" not in result.output
    return result.exit_code, _ANSI.sub("", result.stdout), result.stderr


class Terminal:
    """A pseudo-terminal: `file` is its side a program writes to; `text`, once it is closed
    (leaving the `with`), what was written."""

    def __init__(self) -> None:
        self._master, slave = pty.openpty()
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.file: IO[str] = open(slave, "w", encoding="utf-8")
        self.text = ""

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the other side is closed and all of it read
                return
            if not data:
                return
            self._chunks.append(data)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self._reader.join(timeout=10)
        os.close(self._master)
        self.text = _ANSI.sub("", b"".join(self._chunks).decode().replace("\r\n", "\n"))


def at_terminal(proxy: ServedProxy, *args: str, columns: int = 80) -> str:
    """What `keybrake ARGS` shows in a terminal COLUMNS wide (run in-process, its stdout a
    pseudo-terminal)."""
    env = {"KEYBRAKE_URL": proxy.url, "KEYBRAKE_API_KEY": ADMIN_KEY, "COLUMNS": str(columns)}
    with Terminal() as tty, mock.patch.dict(os.environ, env), redirect_stdout(tty.file):
        code = COMMAND.main(list(args), prog_name="keybrake", standalone_mode=False)
        tty.file.flush()
    assert code in (None, 0)
    return tty.text


@dataclass(frozen=True)
class Listing:
    args: tuple[str, ...]
    headers: str  # comma separated, as the table names its columns
    cells: Callable[[dict[str, Any]], list[str]]  # shown whole; the first starts the row's line
    oldest_first: bool = False  # the table's order, where it is not the JSON's

    def rows(self, proxy: ServedProxy) -> list[dict[str, Any]]:
        args = [a for a in self.args if a not in ("-o", "wide")]
        code, out, err = piped(proxy, *args, "-o", "json")
        assert code == 0, err
        rows: list[dict[str, Any]] = json.loads(out)
        assert rows
        return rows[::-1] if self.oldest_first else rows


def _key(k: dict[str, Any]) -> list[str]:
    shown = [k["key_id"], k["agent_run_label"], k["vendor"], k["status"], f"${k['spent_usd']}"]
    return shown + ([k["budget_id"]] if k["budget_id"] else [])  # in CAP: `$150.00/24h + bg_...`


KEYS = "KEY ID,LABEL,VENDOR,STATUS,SPENT,CAP,CALLS,CAP HITS,EXPIRES,AGE"
LISTINGS = {
    "keys": Listing(("keys", "list"), KEYS, _key),
    "keys wide": Listing(
        ("keys", "list", "-o", "wide"),
        KEYS + ",NAMESPACE,SERVICE ACCOUNT,ISSUER,TOTAL SPENT",
        lambda k: [*_key(k), f"${k['total_spent_usd']}", "admin"],
    ),
    "budgets": Listing(
        ("budgets", "list"),
        "BUDGET ID,LABEL,STATUS,SPENT,TOTAL,CAP,KEYS,EXPIRES",
        lambda b: [b["budget_id"], b["agent_run_label"], b["status"], f"${b['total_spent_usd']}"],
    ),
    "issuers": Listing(
        ("issuers", "list"),
        "ISSUER ID,NAME,STATUS,LABELS,VENDORS,MAX TOTAL,KUBERNETES",
        lambda i: [i["issuer_id"], i["name"], i["status"], f"{i['label_prefix']}*", "stripe"],
    ),
    "audit": Listing(
        ("audit",),
        "TIME,STEP TAG,METHOD,PATH,STATUS,DECISION,USD,VENDOR REQUEST ID",
        lambda r: [
            r["ts"][11:23],
            r["caller_tag"] or "-",
            r["path"],
            str(r["status"]),
            r["decision"],
            r["vendor_request_id"] or "-",
        ],
        oldest_first=True,
    ),
    "events": Listing(
        ("events",),
        "TIME,ACTION,ACTOR,TARGET,OUTCOME,SOURCE",
        lambda e: [e["ts"][:19].replace("T", " "), e["action"], e["actor"], e["target"] or "-"],
    ),
    # (Not its status, attempts or last error: the proxy retries the webhook meanwhile.)
    "alerts": Listing(
        ("alerts",),
        "TIME,SUBJECT,ALERT,STATUS,ATTEMPTS,LAST ERROR,DELIVERY ID",
        lambda a: [
            a["created_at"][:19].replace("T", " "),
            a["subject_id"],
            a["mark"],
            a["delivery_id"],
        ],
    ),
}


def _headers(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


@pytest.mark.parametrize("columns", [80, 140, 220])
@pytest.mark.parametrize("name", LISTINGS)
def test_a_piped_listing_is_a_row_a_line_every_column_and_cell_whole(
    proxy: ServedProxy, name: str, columns: int
) -> None:
    """`keys list -o table | cat` split `$150.0`/`0/24h` and dropped columns; `-o wide | cat`
    broke its headers (`VEND OR`) even at 140 columns; audit cut paths, alerts split delivery ids,
    and an issuer's labels showed as `argo/payments-…` at 220."""
    listing = LISTINGS[name]
    rows = listing.rows(proxy)
    args = listing.args if "-o" in listing.args else (*listing.args, "-o", "table")
    code, out, _ = piped(proxy, *args, columns=columns)
    lines = out.splitlines()
    assert code == 0
    assert _headers(lines[0]) == listing.headers.split(",")
    assert len(lines) == 1 + len(rows), out
    for line, row in zip(lines[1:], rows, strict=True):
        cells = listing.cells(row)
        assert line.startswith(cells[0]), line
        for cell in cells:
            assert cell in line, (cell, line)
    assert "…" not in out


@pytest.mark.parametrize("name", LISTINGS)
def test_a_listing_at_an_80_column_terminal_splits_no_word_and_drops_no_column(
    proxy: ServedProxy, name: str
) -> None:
    """A table fits the terminal by folding cells between words; when even that cannot fit (or
    with -o wide) it is printed whole, a row a line, as kubectl's."""
    listing = LISTINGS[name]
    rows = listing.rows(proxy)
    out = at_terminal(proxy, *listing.args, columns=80)
    lines = [line.rstrip() for line in out.splitlines()]
    assert _headers(lines[0]) == listing.headers.split(",")
    words = set(out.split())
    for row in rows:
        for cell in listing.cells(row):
            assert set(cell.split()) <= words, (cell, out)
    whole = len(lines) == 1 + len(rows)
    assert whole or all(len(line) <= 80 for line in lines), out
    if "wide" in listing.args:
        assert whole and max(len(line) for line in lines) > 80


def test_a_table_folds_between_words_to_fit_a_terminal_never_splitting_one() -> None:
    grid = Grid.of("KEY ID,NOTE,USD", right="USD")
    grid.rows += [
        ["vk_0123456789abcdef", "a note of several words that folds", "$1.00"],
        ["vk_fedcba9876543210", "-", "$20.00/24h"],
    ]

    def shown(width: int, *, wide: bool = False) -> list[str]:
        with Terminal() as tty:
            print_grid(grid, Console(file=tty.file, width=width), wide=wide)
        return [line.rstrip() for line in tty.text.splitlines()]

    folded = shown(45)
    assert len(folded) > 3 and all(len(line) <= 45 for line in folded)
    assert _headers(folded[0]) == ["KEY ID", "NOTE", "USD"]
    assert set("a note of several words that folds".split()) <= set(" ".join(folded).split())
    assert folded[1].startswith("vk_0123456789abcdef") and "$1.00" in folded[1]
    # Too narrow for its longest words, or -o wide: whole, a row a line, as kubectl's.
    for lines in (shown(30), shown(45, wide=True)):
        assert len(lines) == 3 and "a note of several words that folds" in lines[1]
    # Not a terminal, though rich may colour it (FORCE_COLOR, TTY_COMPATIBLE): a row a line.
    log = io.StringIO()
    print_grid(grid, Console(file=log, width=30, force_terminal=True, color_system=None))
    assert len(log.getvalue().splitlines()) == 3


def test_a_detail_is_whole_piped_its_lines_under_its_value(proxy: ServedProxy) -> None:
    """`keys show -o table | cat`: a value of several lines (the allowed endpoints) keeps its
    column; nothing is cut however narrow COLUMNS says."""
    [key] = [k for k in LISTINGS["keys"].rows(proxy) if k["agent_run_label"] == LONG_LABEL]
    code, out, _ = piped(proxy, "keys", "show", key["key_id"], "-o", "table", columns=40)
    lines = out.splitlines()
    assert code == 0 and "…" not in out
    assert re.fullmatch(r"Label +" + LONG_LABEL, lines[1])
    [allowed] = [n for n, line in enumerate(lines) if line.startswith("Allowed")]
    column = lines[allowed].index("POST")
    assert lines[allowed + 1] == " " * column + "GET /v1/customers/*/sources/*"


def test_names_are_kind_slash_id_and_go_back_into_the_commands(proxy: ServedProxy) -> None:
    """`-o name` printed bare ids, and issuers had none; kubectl's `pod/x` is what scripts pipe
    on, and `show`, `revoke` and `delete` take it back."""
    for args, kind, field in (
        (("keys", "list"), "key", "key_id"),
        (("budgets", "list"), "budget", "budget_id"),
        (("issuers", "list"), "issuer", "issuer_id"),
    ):
        code, out, err = piped(proxy, *args, "-o", "json")
        expected = [f"{kind}/{row[field]}" for row in json.loads(out)]
        code, out, err = piped(proxy, *args, "-o", "name")
        assert code == 0 and out.splitlines() == expected, err
        code, out, err = piped(proxy, args[0], "show", expected[0], "-o", "json")
        assert code == 0 and f"{kind}/{json.loads(out)[field]}" == expected[0], err
    key = proxy.issue(agent_run_label="argo/named")
    code, out, err = piped(proxy, "revoke", f"key/{key['key_id']}", "-o", "json")
    assert code == 0 and json.loads(out)["revoked"] == 1, err


@pytest.mark.parametrize(
    "args,flag,valid",
    [
        (("events", "--action", "bogus"), "--action", ACTIONS),
        (("keys", "list", "--status", "bogus"), "--status", STATUSES),
        (("budgets", "list", "--status", "bogus"), "--status", STATUSES),
        (("keys", "list", "--vendor", "paypal"), "--vendor", VENDOR_NAMES),
        (("audit", "--vendor", "paypal"), "--vendor", VENDOR_NAMES),
        (("keys", "list", "-o", "bogus"), "--output", tuple(ListOutput)),
        (("issuers", "list", "-o", "bogus"), "--output", tuple(ListOutput)),
        (("audit", "-o", "bogus"), "--output", tuple(AuditOutput)),
        (("events", "-o", "bogus"), "--output", tuple(Output)),
        (("alerts", "-o", "bogus"), "--output", tuple(Output)),
        (("keys", "show", "vk_x", "-o", "wide"), "--output", tuple(Output)),
    ],
)
def test_an_unknown_filter_value_is_a_usage_error_naming_the_valid_ones(
    args: tuple[str, ...], flag: str, valid: tuple[str, ...]
) -> None:
    """`events --action bogus` printed `[]` and exited 0: a typo read as "nothing happened".
    Refused before anything is sent (no proxy listens here)."""
    code, out, err = piped(None, *args)
    assert (code, out) == (2, "")
    assert err.strip() == f"error: {flag} must be one of: {', '.join(valid)}"


def test_the_actions_and_statuses_offered_are_those_of_the_proxy() -> None:
    """`events --action` offers every action the proxy records (keybrake.proxy.vault, .admin and
    .access name them where they act), and `--status` the statuses the admin API filters by."""
    from keybrake.proxy.admin import _STATUSES

    recorded: set[str] = set()
    for module in ("vault", "admin", "access"):
        tree = ast.parse((ROOT / "proxy" / f"{module}.py").read_text())
        recorded |= {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"[a-z]+\.[a-z]+", node.value)
        }
    assert recorded == set(ACTIONS)
    assert STATUSES == _STATUSES


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _command(path: tuple[str, ...]) -> Any:
    command = COMMAND
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", list(_commands(COMMAND)), ids=lambda p: " ".join(p) or "-")
def test_help_shows_every_option_and_default_whole_and_no_type_placeholder(
    path: tuple[str, ...],
) -> None:
    """At 80 columns, help cut defaults (`http://127.0.0.…`) and option names
    (`--max-daily-us…`), and showed `<bool>` on every flag and `<str>` on every option."""
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    out = result.stdout
    assert result.exit_code == 0
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert not re.search(r"<(bool|str|int|float|path|list)\b", out), out
    command = _command(path)
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    for param in params:
        for name in [*param.opts, *param.secondary_opts]:
            shown = re.escape(name) + r"(?![\w-])"
            assert re.search(r"(?<![\w-])" + shown, out), (name, out)
            # click writes a placeholder after an option's name with one space: `--label TEXT`
            assert not re.search(shown + r" (<|[A-Z]{2,}\b)", out), (name, out)
        default = getattr(param.default, "value", param.default)
        shown_default = param.param_type_name == "option" and param.show_default is not False
        if (
            shown_default
            and isinstance(default, str | int | Path)
            and not isinstance(default, bool)
        ):
            # whole on one line, after its label (which may end the line before)
            assert any(f"{default}" in line for line in out.splitlines()), (param.name, out)
            assert f"default: {default}" in " ".join(out.split()), (param.name, out)


def test_help_keeps_a_long_default_on_one_line() -> None:
    result = runner.invoke(app, ["issuers", "create", "--help"], env={"COLUMNS": "80"})
    [line] = [line for line in result.stdout.splitlines() if "default: http" in line]
    assert line.strip().endswith("default: http://127.0.0.1:8080]")
    assert "--max-daily-usd-cap" in result.stdout and "--k8s-service-account" in result.stdout
