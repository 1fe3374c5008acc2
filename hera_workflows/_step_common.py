"""What the keybrake step scripts share: HTTP to the proxy (or the Kubernetes API) with retries,
the inputs Argo passes, and the step's credential. Standard library only, like the steps.

`_step_issue.py` and `_step_revoke.py` import it, which is how keybrake's tests run them. A pod
cannot import keybrake, so `step_pod.step_source` puts everything below the `__future__` import
here in place of each step's `from ._step_common import ...`: the script embedded in a template
stays one self-contained file.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)
TIMEOUT_SECONDS = 15.0


class Unavailable(Exception):
    """The server could not be reached, or answered 5xx, on every attempt."""


class InputError(Exception):
    """An input the template passed is missing or malformed."""


def call_proxy(
    method: str,
    url: str,
    token: str,
    payload: Any = None,
    sleep: Callable[[float], None] = time.sleep,
    *,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """One HTTP call with retries (to the proxy, or the Kubernetes API): connection errors,
    timeouts and 5xx are retried with backoff; any other answer is returned as (status, decoded
    JSON body or None)."""
    if not url.startswith(("http://", "https://")):
        raise Unavailable(f"the URL must start with http:// or https://, got {url!r}")
    data = None if payload is None else json.dumps(payload).encode()
    sent = {"Authorization": f"Bearer {token}", "Accept": "application/json", **(headers or {})}
    if data is not None:
        sent["Content-Type"] = "application/json"
    problem = ""
    for delay in (*BACKOFF_SECONDS, None):
        request = urllib.request.Request(url, data, sent, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=TIMEOUT_SECONDS, context=context
            ) as response:
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
    """The error as one line: the proxy's envelope (an "error" object with "type" and
    "message"), or a Kubernetes Status (its "message")."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        kind, message = error.get("type", ""), error.get("message", "")
        return f"{message} ({kind})" if kind else str(message)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return ""


UNRESOLVED = "{" * 2  # spelled so that Argo never sees a variable in this source


def present(value: str | None) -> str:
    """A parameter Argo left unresolved still starts with two braces: treat it as missing."""
    value = (value or "").strip()
    return "" if value.startswith(UNRESOLVED) else value


def usd(text: str, name: str) -> str:
    """A positive dollar amount, sent as its decimal string: exact (a JSON number could be read
    as a binary float on the way), and the proxy reads it as a Decimal. The Hera library checks
    the amounts it is given with this function too, so what it accepts the step accepts."""
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise InputError(
            f"{name} must be a dollar amount such as 300 or 12.50, got {text!r}"
        ) from None
    if not amount.is_finite() or amount <= 0:
        raise InputError(f"{name} must be a positive dollar amount, got {text!r}")
    return str(amount)


def credentials(env: Mapping[str, str]) -> tuple[str, ssl.SSLContext | None]:
    """The token this step presents to the proxy, read fresh: the pod's projected
    service-account token (KEYBRAKE_TOKEN_FILE, rotated by the kubelet), else an issuer token
    from a Secret (KEYBRAKE_API_KEY); and the TLS context for an https proxy whose CA is in
    KEYBRAKE_CA_BUNDLE (else the system's)."""
    token_file = present(env.get("KEYBRAKE_TOKEN_FILE"))
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as source:
                token = source.read().strip()
        except OSError as exc:
            raise InputError(
                f"cannot read the service-account token at {token_file} ({exc}): the template "
                "projects it (serviceAccountToken volume, audience keybrake)"
            ) from exc
    else:
        token = present(env.get("KEYBRAKE_API_KEY"))
    if not token:
        raise InputError(
            "no credential: neither KEYBRAKE_TOKEN_FILE (a projected service-account token) nor "
            "KEYBRAKE_API_KEY (an issuer token from a Secret, default keybrake-credentials, key "
            "api_key) is set"
        )
    bundle = present(env.get("KEYBRAKE_CA_BUNDLE"))
    try:
        context = ssl.create_default_context(cafile=bundle) if bundle else None
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"KEYBRAKE_CA_BUNDLE {bundle}: not a usable CA bundle ({exc})") from exc
    return token, context
