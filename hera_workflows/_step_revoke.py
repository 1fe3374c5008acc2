"""keybrake teardown-revoke step, the workflow's exit handler. This file, with `_step_common.py`
in place of its import of it, is the `source` of a script template: it runs in a pod
(python:3.12-alpine, standard library only), never imported by keybrake itself except in tests.

It runs whatever happened to the workflow (success, failure, error, stop, deadline). It revokes the
run's budget by its id (which revokes every key drawing on it) and the run's vault key by its id;
with neither id (the issue steps never ran, or failed after issuing) it revokes by the run's label
`argo/<workflow>`, keys and budgets, narrowed to the run's namespace and uid. Its credential is
the pod's projected service-account token (or an issuer token from a Secret). "Already revoked"
and an unknown id count as done. It prints a one-line spend summary and writes it as the step's
output.

It always exits 0: a teardown problem is reported in the summary, never turned into a failed
workflow (the key still expires on its own).
"""

from __future__ import annotations

import os
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ._step_common import InputError, Unavailable, call_proxy, credentials, error_message, present


def dollars(value: Any) -> Decimal:
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return Decimal(0)


def usd(amount: Decimal) -> str:
    """$12.40, or every digit when cents would round it ($0.0083 for one SMS segment)."""
    cents = amount.quantize(Decimal("0.01"))
    return f"${cents}" if cents == amount else f"${amount.normalize():f}"


def spend(items: list[dict[str, Any]]) -> str:
    """'spent $X of $Y cap, N calls, M cap hits' over keys or budgets: their whole lives' spend,
    against their lifetime caps (their 24-hour caps when they have none)."""
    spent = sum(
        (dollars(i.get("total_spent_usd", i.get("spent_usd", 0))) for i in items), Decimal(0)
    )
    cap = sum(
        (dollars(i.get("total_usd_cap") or i.get("daily_usd_cap") or 0) for i in items),
        Decimal(0),
    )
    calls = sum(int(i.get("calls", 0) or 0) for i in items)
    hits = sum(int(i.get("cap_hits", 0) or 0) for i in items)
    of = f" of {usd(cap)} cap" if cap else ""
    return (
        f"spent {usd(spent)}{of}, {calls} call{'s' * (calls != 1)}, "
        f"{hits} cap hit{'s' * (hits != 1)}"
    )


class Proxy:
    """The proxy as this step reaches it: URL, credential, TLS context, and the sleep to back
    off with."""

    def __init__(
        self, url: str, token: str, context: ssl.SSLContext | None, sleep: Callable[[float], None]
    ) -> None:
        self.url, self.token, self.context, self.sleep = url, token, context, sleep

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        return call_proxy(
            method, f"{self.url}{path}", self.token, payload, self.sleep, context=self.context
        )


def revoke_by_id(proxy: Proxy, key_id: str) -> str:
    path = f"/vault/keys/{urllib.parse.quote(key_id, safe='')}"
    status, answer = proxy.call("DELETE", path)
    if status == 404:
        return f"key {key_id} is unknown to the proxy: nothing to revoke"
    if not 200 <= status < 300 or not isinstance(answer, dict):
        return f"WARNING: could not revoke {key_id}: HTTP {status}: {error_message(answer)}"
    if "spent_usd" not in answer:
        status, info = proxy.call("GET", path)
        if 200 <= status < 300 and isinstance(info, dict):
            answer = {**info, "status": answer.get("status", info.get("status"))}
    state = answer.get("status", "revoked")
    return f"key {key_id} {state}: {spend([answer])}"


def revoke_budget(proxy: Proxy, budget_id: str) -> tuple[str, list[str]]:
    """Revoke the budget, and so every key drawing on it: (summary, those keys' ids)."""
    status, answer = proxy.call(
        "DELETE", f"/vault/budgets/{urllib.parse.quote(budget_id, safe='')}"
    )
    if status == 404:
        return f"budget {budget_id} is unknown to the proxy: nothing to revoke", []
    if not 200 <= status < 300 or not isinstance(answer, dict):
        return (
            f"WARNING: could not revoke {budget_id}: HTTP {status}: {error_message(answer)}",
            [],
        )
    keys = [str(k) for k in answer.get("keys") or []]
    state = answer.get("status", "revoked")
    return f"budget {budget_id} {state} with its {len(keys)} key(s): {spend([answer])}", keys


def revoke_by_label(proxy: Proxy, label: str, namespace: str, uid: str) -> str:
    """Everything of this run: its label, narrowed to its namespace and workflow uid, so a run
    of the same name in another namespace keeps its keys."""
    payload = {"agent_run_label": label}
    if namespace:
        payload["namespace"] = namespace
    if uid:
        payload["workflow_uid"] = uid
    status, answer = proxy.call("POST", "/vault/keys/revoke", payload)
    if not 200 <= status < 300 or not isinstance(answer, dict):
        reason = error_message(answer)
        return f"WARNING: could not revoke keys labelled {label}: HTTP {status}: {reason}"
    keys = [k for k in answer.get("keys") or [] if isinstance(k, dict)]
    budgets = [b for b in answer.get("budgets") or [] if isinstance(b, dict)]
    revoked = answer.get("revoked", len(keys))
    if not budgets and (not keys or not revoked):
        return f"no id and nothing active labelled {label}: nothing to revoke"
    what = f"{revoked} key(s)" + (f" and {len(budgets)} budget(s)" if budgets else "")
    return f"no id, revoked {what} labelled {label}: {spend(budgets or keys)}"


def summarize(env: Mapping[str, str], sleep: Callable[[float], None]) -> str:
    url = present(env.get("KEYBRAKE_URL")).rstrip("/")
    key_id = present(env.get("KEYBRAKE_KEY_ID"))
    budget_id = present(env.get("KEYBRAKE_BUDGET_ID"))
    label = present(env.get("KEYBRAKE_LABEL"))
    if not url:
        return "WARNING: could not revoke: KEYBRAKE_URL is empty; the key stays usable until expiry"
    try:
        token, context = credentials(env)
    except InputError as exc:
        return f"WARNING: could not revoke: {exc}; the key stays usable until it expires"
    proxy = Proxy(url, token, context, sleep)
    try:
        done: list[str] = []
        covered: list[str] = []
        if budget_id:
            summary, covered = revoke_budget(proxy, budget_id)
            done.append(summary)
        if key_id and key_id not in covered:  # a key drawing on the budget went with it
            done.append(revoke_by_id(proxy, key_id))
        if done:
            return "; ".join(done)
        if label:
            namespace = present(env.get("KEYBRAKE_WORKFLOW_NAMESPACE"))
            uid = present(env.get("KEYBRAKE_WORKFLOW_UID"))
            return revoke_by_label(proxy, label, namespace, uid)
        return "WARNING: could not revoke: neither an id nor a run label was passed"
    except Unavailable as exc:
        return f"WARNING: could not revoke: {exc}; the key stays usable until it expires"


def main(env: Mapping[str, str] = os.environ, sleep: Callable[[float], None] = time.sleep) -> int:
    try:
        summary = summarize(env, sleep)
    except Exception as exc:  # the exit handler must never turn the workflow failed
        summary = f"WARNING: could not revoke: {type(exc).__name__}: {exc}"
    line = f"keybrake: {summary}"
    status = present(env.get("KEYBRAKE_WORKFLOW_STATUS"))
    if status:
        line += f" (workflow {status})"
    print(line, flush=True)
    output_dir = present(env.get("KEYBRAKE_OUTPUT_DIR"))
    if output_dir:
        try:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "summary"), "w", encoding="utf-8") as out:
                out.write(line)
        except OSError as exc:
            print(f"keybrake: could not write the summary output: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
