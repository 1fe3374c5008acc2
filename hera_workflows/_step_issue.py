"""keybrake issue step: a vault key, or a run's budget. This file is the `source` of a script
template: it runs in a pod (python:3.12-alpine, standard library only), never imported by
keybrake itself except in tests.

Inputs come from environment variables the template sets (never spliced into this source, so no
parameter value can change the code). The admin token comes from a Secret. It asks the keybrake
proxy for a vault key (POST /vault/keys) or, with KEYBRAKE_ISSUE=budget, for a budget (POST
/vault/budgets), and writes the ids (and the key) where Argo collects the step's output
parameters. The vault key itself is never printed.

Exit codes: 0 issued; 77 the proxy refused (an HTTP 4xx: bad input or admin token) or an input is
invalid, so a retry cannot help; 75 the proxy stayed unreachable or answered 5xx after every
attempt; 1 the key was issued but its outputs could not be written (the exit handler then revokes
it by label).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

EXIT_REFUSED = 77
EXIT_UNAVAILABLE = 75
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)
TIMEOUT_SECONDS = 15.0


# --- HTTP to the proxy: the same block in _step_issue.py and _step_revoke.py (a test checks) ---
class Unavailable(Exception):
    """The proxy could not be reached, or answered 5xx, on every attempt."""


def call_proxy(
    method: str,
    url: str,
    token: str,
    payload: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, Any]:
    """One admin call with retries: connection errors, timeouts and 5xx are retried with
    backoff; any other answer is returned as (status, decoded JSON body or None)."""
    if not url.startswith(("http://", "https://")):
        raise Unavailable(f"the proxy URL must start with http:// or https://, got {url!r}")
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    problem = ""
    for delay in (*BACKOFF_SECONDS, None):
        request = urllib.request.Request(url, data, headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
                return response.status, decode(response.read())
        except urllib.error.HTTPError as exc:
            body = decode(exc.read())
            if exc.code < 500:
                return exc.code, body
            problem = f"HTTP {exc.code}: {error_message(body) or exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        if delay is None:
            break
        print(f"keybrake: {method} {url} failed ({problem}); retrying in {delay:g}s", flush=True)
        sleep(delay)
    raise Unavailable(f"{method} {url} failed after {len(BACKOFF_SECONDS) + 1} attempts: {problem}")


def decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        error = {"type": "not_json", "message": raw[:300].decode(errors="replace")}
        return {"error": error}


def error_message(body: Any) -> str:
    """The proxy's error envelope, {"error": {"type": T, "message": M} }, as one line."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        kind, message = error.get("type", ""), error.get("message", "")
        return f"{message} ({kind})" if kind else str(message)
    return ""


UNRESOLVED = "{" * 2  # spelled so that Argo never sees a variable in this source


def present(value: str | None) -> str:
    """A parameter Argo left unresolved still starts with two braces: treat it as missing."""
    value = (value or "").strip()
    return "" if value.startswith(UNRESOLVED) else value


# --- end of the shared block -------------------------------------------------------------------


class InputError(Exception):
    """An input the template passed is missing or malformed."""


def required(env: Mapping[str, str], name: str, what: str) -> str:
    value = present(env.get(name))
    if not value:
        raise InputError(f"{name} is empty: {what}")
    return value


def usd(text: str, name: str) -> str:
    """A positive dollar amount, sent as its decimal string: exact (a JSON number could be read
    as a binary float on the way), and the proxy reads it as a Decimal."""
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise InputError(
            f"{name} must be a dollar amount such as 300 or 12.50, got {text!r}"
        ) from None
    if not amount.is_finite() or amount <= 0:
        raise InputError(f"{name} must be a positive dollar amount, got {text!r}")
    return str(amount)


def endpoints(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InputError(
            "KEYBRAKE_ALLOWED_ENDPOINTS must be a non-empty JSON list of strings such as "
            f'["POST /v1/payment_intents"], got {text!r}'
        )
    return value


def caps(env: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The optional dollar caps among `names` (KEYBRAKE_<NAME> variables) that are set."""
    found = {}
    for name in names:
        value = present(env.get(f"KEYBRAKE_{name.upper()}"))
        if value:
            found[name] = usd(value, name)
    return found


def run_metadata(env: Mapping[str, str]) -> dict[str, str]:
    metadata = {
        field: present(env.get(variable))
        for field, variable in (
            ("workflow", "KEYBRAKE_WORKFLOW_NAME"),
            ("namespace", "KEYBRAKE_WORKFLOW_NAMESPACE"),
            ("uid", "KEYBRAKE_WORKFLOW_UID"),
        )
    }
    return {field: value for field, value in metadata.items() if value}


def build_request(env: Mapping[str, str]) -> dict[str, Any]:
    """The POST /vault/keys body, from the step's environment."""
    body: dict[str, Any] = {
        "vendor": required(env, "KEYBRAKE_VENDOR", "the vendor input, e.g. stripe"),
        "allowed_endpoints": endpoints(
            required(env, "KEYBRAKE_ALLOWED_ENDPOINTS", "a JSON list of endpoints")
        ),
        "agent_run_label": required(env, "KEYBRAKE_LABEL", "the run label, argo/<workflow>"),
        **caps(env, ("daily_usd_cap", "total_usd_cap", "max_usd_per_call", "max_usd_per_caller")),
    }
    budget_id = present(env.get("KEYBRAKE_BUDGET_ID"))
    if budget_id:
        body["budget_id"] = budget_id
        # empty: the proxy lets a key drawing on a budget live as long as the budget
        expires_in = present(env.get("KEYBRAKE_EXPIRES_IN"))
        if expires_in:
            body["expires_in"] = expires_in
    else:
        if "daily_usd_cap" not in body and "total_usd_cap" not in body:
            raise InputError(
                "give daily_usd_cap or total_usd_cap, or a budget_id for the key to draw on"
            )
        body["expires_in"] = required(env, "KEYBRAKE_EXPIRES_IN", "a duration such as 2h")
    body["metadata"] = run_metadata(env)
    return body


def build_budget_request(env: Mapping[str, str]) -> dict[str, Any]:
    """The POST /vault/budgets body, from the step's environment."""
    body: dict[str, Any] = {
        "agent_run_label": required(env, "KEYBRAKE_LABEL", "the run label, argo/<workflow>"),
        "expires_in": required(env, "KEYBRAKE_EXPIRES_IN", "a duration such as 6h"),
        **caps(env, ("daily_usd_cap", "total_usd_cap")),
    }
    if "daily_usd_cap" not in body and "total_usd_cap" not in body:
        raise InputError("give total_usd_cap (the run's whole life) and/or daily_usd_cap")
    body["metadata"] = run_metadata(env)
    return body


def describe(caps_given: Mapping[str, Any]) -> str:
    shown = [
        f"${caps_given[name]}{suffix}"
        for name, suffix in (
            ("daily_usd_cap", "/24h"),
            ("total_usd_cap", " total"),
            ("max_usd_per_caller", " per pod"),
        )
        if caps_given.get(name) not in (None, "")
    ]
    return ", ".join(shown)


def main(env: Mapping[str, str] = os.environ, sleep: Callable[[float], None] = time.sleep) -> int:
    budget = present(env.get("KEYBRAKE_ISSUE")) == "budget"
    what = "a budget" if budget else "a vault key"
    try:
        proxy = required(env, "KEYBRAKE_URL", "the proxy_url input").rstrip("/")
        token = required(
            env,
            "KEYBRAKE_API_KEY",
            "it comes from a Secret (default keybrake-credentials, key api_key)",
        )
        output_dir = required(env, "KEYBRAKE_OUTPUT_DIR", "where the outputs are written")
        body = build_budget_request(env) if budget else build_request(env)
    except InputError as exc:
        print(f"keybrake: cannot issue {what}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    path = "/vault/budgets" if budget else "/vault/keys"
    try:
        status, answer = call_proxy("POST", f"{proxy}{path}", token, body, sleep)
    except Unavailable as exc:
        print(f"keybrake: cannot issue {what}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if not 200 <= status < 300:
        reason = error_message(answer) or "no error message"
        print(
            f"keybrake: the proxy refused to issue {what}: HTTP {status}: {reason}", file=sys.stderr
        )
        return EXIT_REFUSED
    answer = answer if isinstance(answer, dict) else {}
    outputs = (
        {"budget_id": str(answer.get("budget_id", ""))}
        if budget
        else {
            "key_id": str(answer.get("key_id", "")),
            "vault_key": str(answer.get("vault_key", "")),
        }
    )
    if not all(outputs.values()):
        print(f"keybrake: the proxy answered without {', '.join(outputs)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    issued = outputs.get("key_id") or outputs["budget_id"]
    try:
        os.makedirs(output_dir, exist_ok=True)
        for name, value in outputs.items():
            with open(os.path.join(output_dir, name), "w", encoding="utf-8") as out:
                out.write(value)
    except OSError as exc:
        print(
            f"keybrake: issued {issued} but could not write the step outputs ({exc}); "
            f"the exit handler revokes it by label {body['agent_run_label']}",
            file=sys.stderr,
        )
        return 1
    caps_shown = describe(answer) or describe(body)
    if budget:
        detail = f"caps {caps_shown}"
    else:
        on = f", on budget {body['budget_id']}" if "budget_id" in body else ""
        detail = (
            f"for {body['vendor']}: {caps_shown or 'no caps of its own'}{on}, "
            f"endpoints {', '.join(body['allowed_endpoints'])}"
        )
    print(
        f"keybrake: issued {issued} {detail}, "
        f"expires {answer.get('expires_at', body.get('expires_in', 'with its budget'))}, "
        f"label {body['agent_run_label']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
