"""`keybrake demo`: the whole story on this machine, with no vendor account.

Starts localstripe (a Stripe emulator, run only as a separate process) and a real proxy process on
its embedded SQLite database, issues a $300-capped key labelled like an Argo run, fans out 500
concurrent $1 PaymentIntents through the official Stripe SDK, revokes by workflow name, and shows
the audit summary. Everything it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keybrake.cli._common import console, fail
from keybrake.cli._render import audit_table
from keybrake.cli._table import print_grid
from keybrake.proxy.client import KeybrakeClient
from keybrake.proxy.models import KeyCreate

# keybrake is on no package index, so the `demo` extra comes from a checkout.
_DEMO_EXTRA = "Run `make demo` in a keybrake checkout, or `pip install '.[demo]'` there."


def demo(
    calls: Annotated[int, typer.Option(min=1, max=5000, help="Concurrent PaymentIntents.")] = 500,
    cap: Annotated[int, typer.Option(min=1, help="Daily USD cap of the key.")] = 300,
) -> None:
    """Run the vault-key story end to end on this machine (SQLite + localstripe), in under a minute.

    Example: keybrake demo
    """
    try:
        import stripe  # noqa: F401  (the demo's workload uses the official SDK)
    except ImportError:
        fail("the demo needs the Stripe SDK and localstripe", hint=_DEMO_EXTRA)
    localstripe = shutil.which(
        "localstripe", path=str(Path(sys.executable).parent)
    ) or shutil.which("localstripe")
    if localstripe is None:
        fail("the demo needs localstripe", hint=_DEMO_EXTRA)
    started = time.monotonic()
    # `kill -USR1` prints every thread's stack: how to see where a stuck demo is.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        # The event loop exists before anything starts, so a Ctrl-C during the fan-out cancels
        # its task cleanly (asyncio.Runner's own SIGINT handling) instead of landing mid-setup.
        with (
            asyncio.Runner() as runner,
            tempfile.TemporaryDirectory(prefix="keybrake-demo-") as workdir,
            _processes() as procs,
        ):
            _run(Path(workdir), localstripe, procs, calls, cap, runner)
    except KeyboardInterrupt:
        console().print("\n[yellow]interrupted: the proxy and localstripe are stopped[/]")
        raise typer.Exit(130) from None
    console().print(
        f"\n[bold green]demo finished[/] in {time.monotonic() - started:.1f}s; "
        "everything it started is stopped."
    )


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"{what} exited early:\n{log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.05)  # polling a readiness URL
    fail(f"{what} did not become ready within 30s")


def _run(
    workdir: Path,
    localstripe: str,
    procs: list[subprocess.Popen[bytes]],
    calls: int,
    cap: int,
    runner: asyncio.Runner,
) -> None:
    out = console()
    out.rule("[bold]keybrake demo[/]: vault keys for an Argo fan-out")
    stripe_port = _free_port()
    stripe_log = workdir / "localstripe.log"
    with open(stripe_log, "wb") as log:
        procs.append(
            subprocess.Popen(
                [localstripe, "--port", str(stripe_port), "--from-scratch"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    stripe_url = f"http://127.0.0.1:{stripe_port}"
    _wait_ready(f"{stripe_url}/v1/customers", procs[-1], "localstripe", stripe_log)
    out.print(f"1. localstripe (Stripe emulator) on {stripe_url}")

    admin_key = "kba_" + secrets.token_urlsafe(24)
    proxy_port = _free_port()
    database = workdir / "keybrake.db"
    env = {
        **os.environ,
        "KEYBRAKE_API_KEY": admin_key,
        "KEYBRAKE_DATABASE_URL": f"sqlite:///{database}",
        "KEYBRAKE_STRIPE_SECRET_KEY": "sk_test_demo_" + secrets.token_hex(8),
        "KEYBRAKE_STRIPE_API_BASE": stripe_url,
    }
    proxy_log = workdir / "proxy.log"
    keybrake = [sys.executable, "-m", "keybrake.cli"]
    with open(proxy_log, "wb") as log:
        procs.append(
            subprocess.Popen(
                [*keybrake, "serve", "--port", str(proxy_port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    _wait_ready(f"{proxy_url}/readyz", procs[-1], "keybrake serve", proxy_log)
    out.print(
        f"2. keybrake proxy on {proxy_url}, SQLite at {database}; "
        "the real Stripe key stays inside it",
        soft_wrap=True,
    )

    workflow = "billing-agent-" + secrets.token_hex(3)
    with KeybrakeClient(proxy_url, admin_key) as client:
        issued = client.issue_key(
            KeyCreate(
                vendor="stripe",
                daily_usd_cap=Decimal(cap),
                allowed_endpoints=["POST /v1/payment_intents"],
                expires_in="2h",
                agent_run_label=f"argo/{workflow}",
                metadata={"namespace": "argo", "workflow": workflow},
            )
        )
        out.print(
            f"3. issued vault key {issued.key_id} for argo/{workflow}: "
            f"${issued.daily_usd_cap} per 24 hours, "
            "only POST /v1/payment_intents",
            soft_wrap=True,
        )

        out.print(f"4. {calls} pods each create a $1 PaymentIntent through the proxy, all at once:")
        outcome = runner.run(_fan_out(issued.vault_key, f"{proxy_url}/stripe", calls))
        kinds = Counter(outcome)
        out.print(
            f"   [green]{kinds['succeeded']} succeeded[/], [red]{kinds['cap_hit']} hit the cap[/] "
            f"(HTTP 429, X-Keybrake-Cap-Hit: true)"
            + "".join(f", {n} {k}" for k, n in kinds.items() if k not in {"succeeded", "cap_hit"})
        )
        held = _count_intents(stripe_url)
        out.print(f"   localstripe holds {held} PaymentIntents: not one over the cap")

        result = client.revoke_label(f"argo/{workflow}")
        out.print(f"5. keybrake revoke --workflow {workflow}: revoked {result.revoked} key(s)")
        refused = _one_more(issued.vault_key, f"{proxy_url}/stripe")
        out.print(f"   a further call: {refused}")

        info = client.get_key(issued.key_id)
        rows = client.audit_page(key_id=issued.key_id, limit=100_000).data
    decisions = Counter(r.decision for r in rows)
    summary = Table(title="6. audit summary", box=None, header_style="bold")
    for column in ("DECISION", "CALLS", "USD"):
        summary.add_column(column, justify="right" if column != "DECISION" else "left")
    for decision, count in decisions.most_common():
        usd = sum((Decimal(r.settled_usd) for r in rows if r.decision == decision), Decimal(0))
        summary.add_row(decision, str(count), f"${usd:.2f}")
    out.print(summary)
    out.print(
        f"   key {info.key_id}: status {info.status}, spent ${info.spent_usd} of "
        f"${info.daily_usd_cap}, {info.calls} calls, {info.cap_hits} cap hits, "
        f"{len(rows)} audit rows",
        soft_wrap=True,
    )
    if out.width >= 100:  # the last rows, where a terminal is wide enough to show them whole
        print_grid(audit_table(list(reversed(rows[:5]))), out)


async def _fan_out(vault_key: str, base: str, calls: int) -> list[str]:
    import stripe

    outcome: list[str] = []
    with Progress(
        TextColumn("   "), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console()
    ) as progress:
        task = progress.add_task("calls", total=calls)

        async def pod(index: int) -> None:
            client = stripe.StripeClient(
                f"{vault_key}.{_pod_name(index)}",
                base_addresses={"api": base},
                http_client=shared,
            )
            try:
                await client.v1.payment_intents.create_async(
                    params={"amount": 100, "currency": "usd", "metadata": {"item": str(index)}}
                )
                outcome.append("succeeded")
            except stripe.RateLimitError as exc:
                capped = exc.headers is not None and exc.headers.get("x-keybrake-cap-hit") == "true"
                outcome.append("cap_hit" if capped else "rate_limited")
            except stripe.StripeError as exc:
                outcome.append(type(exc).__name__)
            progress.advance(task)

        shared = stripe.HTTPXClient()
        await asyncio.gather(*(pod(i) for i in range(calls)))
    return outcome


def _pod_name(index: int) -> str:
    return f"charge-{index:04d}"


def _count_intents(stripe_url: str) -> int:
    total, params = 0, {"limit": 100}
    headers = {"Authorization": "Bearer sk_test_direct"}
    while True:
        page: Any = httpx.get(
            f"{stripe_url}/v1/payment_intents", params=params, headers=headers
        ).json()
        total += len(page["data"])
        if not page.get("has_more"):
            return total
        params["starting_after"] = page["data"][-1]["id"]


def _one_more(vault_key: str, base: str) -> str:
    import stripe

    client = stripe.StripeClient(vault_key, base_addresses={"api": base})
    try:
        client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    except stripe.AuthenticationError as exc:
        return f"[red]refused[/] (HTTP {exc.http_status}: {exc.user_message})"
    return "[red]unexpectedly accepted[/]"
