"""The keybrake CLI in-process (CliRunner) against the proxy app on a loopback socket, error
paths and exit codes too. Where a process of its own is the point (the demo, `keybrake serve`,
`audit --follow` ended by SIGINT, a fresh interpreter's imports): tests/e2e/test_cli_processes.py.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from typing import Any
from unittest import mock

import httpx
import pytest
import typer
import typer.testing
import yaml
from typer.testing import Result

from keybrake.cli.main import app
from keybrake.proxy.client import KeybrakeClient
from keybrake.proxy.errors import ApiError
from tests.fakes.server import free_port
from tests.proxyproc import ADMIN_KEY
from tests.release import pyproject_version
from tests.served import ServedProxy


class CliRunner(typer.testing.CliRunner):
    """typer's CliRunner with the app's click command built once: typer builds it anew from every
    command function's signature on each invoke, ~0.08 s, most of an in-process command's time."""

    def __init__(self) -> None:
        super().__init__()
        self._command = typer.main.get_command(app)

    def invoke(self, cli: typer.Typer, *args: Any, **kwargs: Any) -> Result:
        assert cli is app
        with mock.patch.object(typer.testing, "_get_command", lambda _: self._command):
            return super().invoke(cli, *args, **kwargs)


runner = CliRunner()

ISSUE = [
    "keys",
    "issue",
    "--vendor",
    "stripe",
    "--daily-usd-cap",
    "300",
    "--allow",
    "POST /v1/payment_intents",
    "--expires-in",
    "2h",
    "--label",
    "argo/billing-agent-x7k2p",
]


def run(proxy: ServedProxy | None, *args: str, api_key: str = ADMIN_KEY) -> tuple[int, str, str]:
    env = {"KEYBRAKE_URL": proxy.url if proxy else f"http://127.0.0.1:{free_port()}"}
    env["KEYBRAKE_API_KEY"] = api_key
    env["COLUMNS"] = "200"
    result = runner.invoke(app, list(args), env=env)
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def test_issue_quiet_prints_only_the_vault_key(proxy_server: ServedProxy) -> None:
    code, out, _ = run(proxy_server, *ISSUE, "-q")
    assert code == 0
    assert out.strip().startswith("kbv_") and len(out.strip().splitlines()) == 1


def test_issue_json_and_list_show(proxy_server: ServedProxy) -> None:
    code, out, _ = run(proxy_server, *ISSUE, "--meta", "namespace=argo", "-o", "json")
    assert code == 0
    issued = json.loads(out)
    assert issued["metadata"] == {"namespace": "argo"} and issued["vault_key"].startswith("kbv_")

    code, out, _ = run(
        proxy_server, "keys", "list", "--workflow", "billing-agent-x7k2p", "-o", "json"
    )
    assert code == 0 and [k["key_id"] for k in json.loads(out)] == [issued["key_id"]]
    code, out, _ = run(proxy_server, "keys", "list", "-o", "yaml")
    assert yaml.safe_load(out)[0]["key_id"] == issued["key_id"]
    code, out, _ = run(proxy_server, "keys", "list", "-o", "table")
    assert issued["key_id"] in out and "argo/billing-agent-x7k2p" in out
    code, out, _ = run(proxy_server, "keys", "show", issued["key_id"], "-o", "table")
    assert code == 0 and "Remaining" in out and "$300.00" in out
    assert "kbv_" not in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--expires-in", "2 fortnights"], "invalid duration"),
        (["--daily-usd-cap", "lots"], "not a dollar amount"),
        (["--allow", "FETCH /x"], "unknown method"),
        (["--meta", "novalue"], "key=value"),
        (["--constraint", "customers"], "--constraint 'customers': expected FIELD=VALUE"),
        (["--constraint", "=cus_1"], "expected FIELD=VALUE"),
        (["--constraint", "mode=report"], "give the mode as --constraint-mode"),
        (["--constraint-mode", "report"], "--constraint-mode: give the constraints too"),
        (["--constraint", "customers=bob"], "constraints.customers: 'bob' is not a Stripe"),
        (["--constraint", "recipients=+1*"], "constraints.recipients: not a stripe constraint"),
        (["--constraint", "payees=x"], "constraints: unknown field 'payees'"),
        (
            ["--constraint", "currencies=usd", "--constraint-mode", "loud"],
            "--constraint-mode must be one of: enforce, report",
        ),
    ],
)
def test_issue_usage_errors_exit_2(proxy_server: ServedProxy, args: list[str], needle: str) -> None:
    code, _, err = run(proxy_server, *ISSUE, *args)
    assert code == 2 and needle in err


def test_server_refusals_exit_1_with_the_server_message(proxy_server: ServedProxy) -> None:
    code, _, err = run(proxy_server, "keys", "list", api_key="wrong")
    assert code == 1 and "missing or wrong admin token" in err
    code, _, err = run(proxy_server, "keys", "show", "vk_nope")
    assert code == 1 and "no vault key 'vk_nope'" in err
    code, _, err = run(proxy_server, *[a if a != "stripe" else "paypal" for a in ISSUE])
    assert code == 1 and "not configured" in err


def test_unreachable_proxy_exits_3_with_the_url_and_a_hint() -> None:
    code, _, err = run(None, "keys", "list")
    assert code == 3
    assert "cannot reach the keybrake proxy at http://127.0.0.1:" in err
    assert "keybrake serve" in err


def test_missing_admin_token_is_a_usage_error(proxy_server: ServedProxy) -> None:
    code, _, err = run(proxy_server, "keys", "list", api_key="")
    assert code == 2 and "KEYBRAKE_API_KEY" in err


def test_revoke_by_id_and_again(proxy_server: ServedProxy) -> None:
    key = proxy_server.issue()
    code, out, _ = run(proxy_server, "revoke", key["key_id"], "-o", "table")
    assert code == 0 and "revoked 1 key" in out
    code, out, _ = run(proxy_server, "revoke", key["key_id"], "-o", "table")
    assert code == 0 and "already revoked" in out
    code, _, err = run(proxy_server, "revoke", "vk_nope")
    assert code == 1 and "not found" in err
    code, out, _ = run(proxy_server, "revoke", "vk_nope", "--ignore-not-found", "-o", "table")
    assert code == 0 and "nothing to revoke" in out
    for what, missing in (("keys", "vk_nope"), ("budgets", "bg_nope")):
        code, _, err = run(proxy_server, what, "show", missing)
        assert code == 1 and "HTTP 404" in err
        code, out, err = run(proxy_server, what, "show", missing, "--ignore-not-found")
        assert (code, out, err) == (0, "", "")
    code, _, err = run(proxy_server, "revoke")
    assert code == 2


def test_revoke_by_workflow_and_namespace(proxy_server: ServedProxy) -> None:
    a = proxy_server.issue(agent_run_label="argo/wf", metadata={"namespace": "team-a"})
    b = proxy_server.issue(agent_run_label="argo/wf", metadata={"namespace": "team-b"})
    code, out, _ = run(
        proxy_server, "revoke", "--workflow", "wf", "--namespace", "team-a", "-o", "json"
    )
    report = json.loads(out)
    assert code == 0 and report["revoked"] == 1 and report["keys"][0]["key_id"] == a["key_id"]
    code, out, _ = run(proxy_server, "revoke", "--workflow", "wf", "-o", "table")
    assert (
        code == 0
        and "revoked 1 key of workflow wf" in out
        and "spent $0.00 in the last 24 h" in out
    )
    # As the LABEL column shows it; already revoked is not an error
    code, out, _ = run(proxy_server, "revoke", "--workflow", "argo/wf", "-o", "table")
    assert code == 0 and "nothing revoked" in out
    with proxy_server.admin() as admin:
        assert admin.get(f"/vault/keys/{b['key_id']}").json()["status"] == "revoked"
    # A workflow with no keys at all is NotFound, as kubectl says it (a typo must not pass)
    code, _, err = run(proxy_server, "revoke", "--workflow", "wf-typo")
    assert code == 1 and "no vault keys or budgets of workflow wf-typo" in err
    code, _, err = run(proxy_server, "revoke", "-w", "wf", "-n", "team-c")
    assert code == 1 and "in namespace team-c" in err
    code, _, _ = run(proxy_server, "revoke", "--workflow", "wf-typo", "--ignore-not-found")
    assert code == 0
    code, out, _ = run(proxy_server, "keys", "list", "--workflow", "argo/wf", "-o", "json")
    assert code == 0 and json.loads(out) == []  # active ones by default
    code, out, _ = run(
        proxy_server, "keys", "list", "-w", "argo/wf", "--all-statuses", "-o", "json"
    )
    assert code == 0 and {k["key_id"] for k in json.loads(out)} == {a["key_id"], b["key_id"]}


def test_audit_outputs(proxy_server: ServedProxy) -> None:
    import stripe

    key = proxy_server.issue(daily_usd_cap=1, agent_run_label="argo/audited")
    client = stripe.StripeClient(
        key["vault_key"] + ".pod-7", base_addresses={"api": proxy_server.url + "/stripe"}
    )
    client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    with pytest.raises(stripe.RateLimitError):
        client.v1.payment_intents.create(
            params={"amount": 100, "currency": "usd", "metadata": {"a": "b"}}
        )
    code, out, _ = run(proxy_server, "audit", "--workflow", "audited", "-o", "json")
    rows = json.loads(out)
    assert code == 0 and [r["decision"] for r in rows] == ["cap_hit", "forwarded"]
    code, out, _ = run(proxy_server, "audit", "--key", key["key_id"], "-o", "csv", "--since", "1h")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 2
    code, out, _ = run(proxy_server, "audit", "--workflow", "audited", "-o", "yaml")
    assert code == 0 and [r["caller_tag"] for r in yaml.safe_load(out)] == ["pod-7", "pod-7"]
    code, out, _ = run(proxy_server, "audit", "--workflow", "audited", "-o", "table")
    assert code == 0 and "pod-7" in out and "cap_hit" in out
    code, _, err = run(proxy_server, "audit", "--since", "yesterday")
    assert code == 2 and "--since" in err


def test_watch_exits_when_every_key_is_revoked(
    proxy_server: ServedProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keybrake.cli import watch

    key = proxy_server.issue(agent_run_label="argo/watched")
    watching = threading.Event()
    follow = watch._follow

    def follow_and_say_so(*args: Any) -> None:
        watching.set()  # it has found the run's keys and said so: it is running
        follow(*args)

    monkeypatch.setattr(watch, "_follow", follow_and_say_so)
    done: list[tuple[int, str, str]] = []

    def watch_the_run() -> None:
        try:
            done.append(run(proxy_server, "watch", "--workflow", "watched", "--interval", "0.1"))
        finally:
            watching.set()  # also when it ended without watching: the checks below say how

    command = threading.Thread(target=watch_the_run, daemon=True)
    command.start()
    assert watching.wait(timeout=30)
    with proxy_server.admin() as admin:
        admin.delete(f"/vault/keys/{key['key_id']}")
    command.join(timeout=60)
    assert done, "keybrake watch did not exit within 60 s of the revoke"
    code, out, err = done[0]
    assert "watching argo/watched" in err.splitlines()[0]
    assert code == 0
    assert "every key of argo/watched is revoked or expired" in out


def test_watch_on_an_unknown_run_says_so_and_exits_1(proxy_server: ServedProxy) -> None:
    code, _, err = run(proxy_server, "watch", "--workflow", "never-ran")
    assert code == 1 and "nothing to watch" in err and "argo/never-ran" in err


def test_version_and_help_examples() -> None:
    from keybrake.proxy.decisions import RULE_VERSION

    result = runner.invoke(app, ["version"])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and lines[0] == pyproject_version()
    assert lines[1].startswith(f"ledger rules {RULE_VERSION}; schema: SQLite ")
    commands = [
        ["serve"],
        ["keys", "issue"],
        ["keys", "list"],
        ["keys", "show"],
        ["revoke"],
        ["audit"],
        ["audit", "prune"],
        ["watch"],
        ["demo"],
        ["version"],
    ]
    for command in commands:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, command
        assert "Example" in result.stdout, command


def test_db_upgrade(tmp_path, pg_url: str) -> None:
    for url in (f"sqlite:///{tmp_path / 'x.db'}", pg_url):
        result = runner.invoke(app, ["db", "upgrade", "--database-url", url])
        assert result.exit_code == 0 and "current schema" in result.stdout
    result = runner.invoke(app, ["db", "upgrade", "--database-url", "mysql://x"])
    assert result.exit_code == 2 and "unsupported database URL" in result.stderr


def test_serve_refuses_bad_configuration(tmp_path) -> None:
    env = {"KEYBRAKE_API_KEY": "", "KEYBRAKE_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    result = runner.invoke(app, ["serve"], env=env)
    assert result.exit_code == 2 and "KEYBRAKE_API_KEY is not set" in result.stderr
    env["KEYBRAKE_API_KEY"] = "x"
    env["KEYBRAKE_PRICING_FILE"] = str(tmp_path / "missing.toml")
    result = runner.invoke(app, ["serve"], env=env)
    assert result.exit_code == 2 and "missing.toml" in result.stderr
    env.pop("KEYBRAKE_PRICING_FILE")
    env["KEYBRAKE_MAX_TTL"] = "forever"
    result = runner.invoke(app, ["serve"], env=env)
    assert result.exit_code == 2 and "invalid duration" in result.stderr
    env.pop("KEYBRAKE_MAX_TTL")
    # One line naming the variable; pydantic's several lines and link never reach the operator.
    for name, value, needle in (
        ("KEYBRAKE_UPSTREAM_TIMEOUT", "soon", "valid number"),
        ("KEYBRAKE_KUBERNETES_AUDIENCES", "keybrake", "JSON"),
        ("KEYBRAKE_UPSTREAM_PROXY", "socks5://u:hunter2@proxy:1080", "CONNECT proxy"),
    ):
        result = runner.invoke(app, ["serve"], env={**env, name: value})
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {name}: ") and needle in lines[0]
        assert "pydantic" not in result.stderr and "hunter2" not in result.stderr


def test_serve_reads_a_settings_file(tmp_path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("KEYBRAKE_API_KEY=x\nKEYBRAKE_STRIPE_SECRT_KEY=sk_live_oops\n")
    result = runner.invoke(app, ["serve", "--config", str(bad)], env={"KEYBRAKE_API_KEY": ""})
    assert result.exit_code == 2 and "unknown setting 'KEYBRAKE_STRIPE_SECRT_KEY'" in result.stderr
    missing = runner.invoke(app, ["serve", "--config", str(tmp_path / "nope.env")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    good = tmp_path / "good.env"
    database = f"sqlite:///{tmp_path / 'db'}"
    good.write_text(
        f"KEYBRAKE_API_KEY=x\nKEYBRAKE_MAX_TTL=forever\nKEYBRAKE_DATABASE_URL={database}\n"
    )
    result = runner.invoke(app, ["serve", "--config", str(good)], env={"KEYBRAKE_API_KEY": ""})
    assert result.exit_code == 2 and "invalid duration" in result.stderr  # the file was read


def test_a_vault_key_given_where_an_id_goes_is_never_echoed(proxy_server: ServedProxy) -> None:
    vault_key = proxy_server.issue()["vault_key"]
    for args in (
        ("keys", "show", vault_key),
        ("revoke", vault_key),
        ("keys", "show", "x" + vault_key),
    ):
        code, out, err = run(proxy_server, *args)
        assert code == 1, (args, out, err)
        assert vault_key[4:] not in out + err
        assert "kbv_…(redacted)" in err
    # nor in the proxy's own log
    assert vault_key[4:] not in proxy_server.log_path.read_text()


def test_issuers_and_events_from_the_cli(proxy_server: ServedProxy) -> None:
    code, out, _ = run(
        proxy_server,
        "issuers",
        "create",
        "--name",
        "payments",
        "--label-prefix",
        "argo/payments-",
        "--vendor",
        "stripe",
        "--allow",
        "POST /v1/payment_intents",
        "--max-total-usd-cap",
        "500",
        "--max-expires-in",
        "6h",
        "-q",
    )
    token = out.strip()
    assert code == 0 and token.startswith("kbi_")
    code, out, _ = run(proxy_server, "issuers", "list", "-o", "json")
    [issuer] = json.loads(out)
    assert issuer["name"] == "payments" and token not in out
    # The issuer's token works where the admin token did, within its policy.
    code, out, _ = run(
        proxy_server,
        "keys",
        "issue",
        "--vendor",
        "stripe",
        "--total-usd-cap",
        "50",
        "--allow",
        "POST /v1/payment_intents",
        "--expires-in",
        "1h",
        "--label",
        "argo/payments-nightly",
        "-q",
        api_key=token,
    )
    assert code == 0 and out.startswith("kbv_")
    code, _, err = run(proxy_server, *ISSUE, api_key=token)
    assert code == 1 and "argo/payments-" in err  # outside its labels: the 403 says which limit
    code, _, err = run(proxy_server, "issuers", "list", api_key=token)
    assert code == 1 and "admin token" in err
    code, out, _ = run(proxy_server, "events", "--issuer", issuer["issuer_id"], "-o", "json")
    outcomes = [(e["action"], e["outcome"].split(":")[0]) for e in json.loads(out)]
    assert outcomes[-1] == ("key.issue", "ok") and ("key.issue", "refused") in outcomes
    code, out, _ = run(
        proxy_server, "issuers", "delete", issuer["issuer_id"], "--revoke", "-o", "table"
    )
    assert code == 0 and "revoked 1 key(s)" in out
    code, _, err = run(proxy_server, "keys", "list", api_key=token)
    assert code == 1 and "HTTP 401" in err
    code, out, _ = run(proxy_server, "events", "--action", "login.refused", "-o", "table")
    assert code == 0 and "unknown or deleted issuer token" in out and token not in out


def test_a_revoke_only_issuer_for_the_reaper_from_the_cli(proxy_server: ServedProxy) -> None:
    code, out, _ = run(
        proxy_server,
        "issuers",
        "create",
        "--name",
        "reaper",
        "--label-prefix",
        "argo/",
        "--revoke-only",
        "-o",
        "json",
    )
    assert code == 0 and json.loads(out)["may_issue"] is False
    token = json.loads(out)["issuer_token"]
    code, _, err = run(proxy_server, *ISSUE, api_key=token)
    assert code == 1 and "may only read and revoke" in err


def _continue_token(err: str) -> str:
    [line] = [line for line in err.splitlines() if "--continue" in line]
    return line.split("--continue ")[1].split()[0]


def test_listings_page_like_kubectl(proxy_server: ServedProxy) -> None:
    import re

    import stripe

    made = [proxy_server.issue(agent_run_label=f"argo/paged-{n}") for n in range(5)]
    revoked = proxy_server.issue(agent_run_label="argo/paged-old")
    with proxy_server.admin() as admin:
        admin.delete(f"/vault/keys/{revoked['key_id']}")
    # A page, and a line on stderr saying how to get the next one
    code, out, err = run(proxy_server, "keys", "list", "--limit", "2", "-o", "name")
    first = out.split()
    assert code == 0 and len(first) == 2 and "more keys" in err
    code, out, err = run(
        proxy_server,
        "keys",
        "list",
        "--limit",
        "2",
        "--continue",
        _continue_token(err),
        "-o",
        "name",
    )
    assert code == 0 and len(out.split()) == 2 and not set(out.split()) & set(first)
    # --all: every page; active only unless asked
    code, out, err = run(proxy_server, "keys", "list", "--limit", "2", "--all", "-o", "name")
    assert code == 0 and set(out.split()) == {f"key/{k['key_id']}" for k in made} and err == ""
    code, out, _ = run(proxy_server, "keys", "list", "--all-statuses", "-o", "name")
    assert f"key/{revoked['key_id']}" in out.split()
    code, _, err = run(proxy_server, "keys", "list", "--continue", "garbage")
    assert code == 1 and "continue" in err
    # The table has an AGE column; -o wide adds who issued each key and for which namespace
    code, out, _ = run(proxy_server, "keys", "list", "-o", "table")
    header = out.splitlines()[0]
    assert code == 0 and header.split()[-1] == "AGE" and re.search(r"\b\d+s\b", out)
    code, out, _ = run(proxy_server, "keys", "list", "-o", "wide")
    assert code == 0 and "NAMESPACE" in out and "ISSUER" in out and "admin" in out
    # The audit log and the events page the same way
    client = stripe.StripeClient(
        made[0]["vault_key"], base_addresses={"api": proxy_server.url + "/stripe"}
    )
    for n in range(3):
        client.v1.payment_intents.create(
            params={"amount": 100, "currency": "usd", "metadata": {"n": str(n)}}
        )
    code, out, err = run(proxy_server, "audit", "--limit", "2", "-o", "json")
    assert code == 0 and len(json.loads(out)) == 2 and "more audit rows" in err
    code, out, _ = run(
        proxy_server, "audit", "--limit", "2", "--continue", _continue_token(err), "-o", "json"
    )
    assert code == 0 and len(json.loads(out)) == 1
    code, out, err = run(proxy_server, "events", "--limit", "4", "-o", "json")
    assert code == 0 and len(json.loads(out)) == 4 and "more events" in err
    code, out, err = run(proxy_server, "events", "--limit", "4", "--all", "-o", "json")
    assert code == 0 and len(json.loads(out)) == 7 and err == ""  # 6 issues, 1 revoke


def test_alerts_from_the_cli(proxy_server: ServedProxy) -> None:
    code, out, _ = run(proxy_server, "alerts", "-o", "table")
    assert code == 0 and "No alerts match." in out
    code, out, _ = run(proxy_server, "alerts", "--pending", "-o", "json")
    assert code == 0 and json.loads(out) == []


@pytest.mark.parametrize("given", ["key/", "../budgets", "vk_1?x=1", ""])
def test_an_id_argument_is_an_id_or_a_usage_error(given: str) -> None:
    """`keys show key/` sent `GET /vault/keys/`, a listing, and printed pydantic's traceback;
    `../budgets` asked the proxy something else entirely."""
    code, _, err = run(None, "keys", "show", given)
    assert code == 2 and "is not a key id" in err, err


@pytest.mark.parametrize("body", [b"<html>a login page</html>", b'{"data": "not a key"}'])
def test_an_answer_that_is_not_the_proxy_s_is_an_api_error(body: bytes) -> None:
    """A 2xx page that is not keybrake JSON (a proxy's login page, a redirect's body) escaped as
    a JSON or validation traceback."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    client = KeybrakeClient("http://keybrake", "token", transport=transport)
    with pytest.raises(ApiError, match="did not answer as a keybrake proxy"):
        client.get_key("vk_1")
