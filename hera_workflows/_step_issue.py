"""keybrake issue step: a vault key, or a run's budget. This file, with `_step_common.py` in place
of its import of it, is the `source` of a script template: it runs in a pod (python:3.12-alpine,
standard library only), never imported by keybrake itself except in tests.

Inputs come from environment variables the template sets (never spliced into this source, so no
parameter value can change the code). The credential is the pod's projected service-account
token, or an issuer token from a Secret. It asks the keybrake proxy for a vault key (POST
/vault/keys) or, with KEYBRAKE_ISSUE=budget, for a budget (POST /vault/budgets), with an
`Idempotency-Key` that every retry of the step repeats: the proxy then revokes what an earlier
attempt issued and answers a fresh one, so a retried step never leaves two live keys.
KEYBRAKE_CONSTRAINTS, when not empty, is a JSON object sent on unchanged as the request's
`constraints` (whom the calls may pay or message; the proxy checks it); empty, the request has no
such field, as before the input existed.

With KEYBRAKE_DELIVERY=secret (the default) the vault key goes into a Secret of the run, created
through the Kubernetes API with the pod's own service account (ownerReferences: the Workflow, so
it is deleted with it); only the Secret's name becomes an output. With `parameter` the key itself
is the output `vault_key` (and so visible in the Workflow object). The key is never printed.

Exit codes: 0 issued; 77 refused (an HTTP 4xx from the proxy or the Kubernetes API, or an invalid
input), so a retry cannot help; 75 a server stayed unreachable or answered 5xx after every
attempt; 1 the key was issued but its outputs could not be written (the exit handler then revokes
it by label).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from ._step_common import (
    InputError,
    Unavailable,
    call_proxy,
    credentials,
    error_message,
    present,
    usd,
)

EXIT_REFUSED = 77
EXIT_UNAVAILABLE = 75


def required(env: Mapping[str, str], name: str, what: str) -> str:
    value = present(env.get(name))
    if not value:
        raise InputError(f"{name} is empty: {what}")
    return value


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


def constraints(env: Mapping[str, str]) -> dict[str, Any] | None:
    """The optional constraints input (KEYBRAKE_CONSTRAINTS): a JSON object, sent on as it is
    (the proxy checks its fields and values); empty: none, and the request has no such field."""
    text = present(env.get("KEYBRAKE_CONSTRAINTS"))
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # too deeply nested is no object either
        value = None
    if not isinstance(value, dict):
        # (no doubled braces: Argo would read them in the template's source as a variable)
        example = '{"customers": ["cus_1"], "mode": "enforce"}'
        raise InputError(
            f"KEYBRAKE_CONSTRAINTS must be a JSON object such as {example}, got {text[:80]!r}"
        )
    return value


def run_metadata(env: Mapping[str, str]) -> dict[str, str]:
    metadata = {
        field: present(env.get(variable))
        for field, variable in (
            ("workflow", "KEYBRAKE_WORKFLOW_NAME"),
            ("namespace", "KEYBRAKE_WORKFLOW_NAMESPACE"),
            ("uid", "KEYBRAKE_WORKFLOW_UID"),
            ("cluster", "KEYBRAKE_CLUSTER"),
        )
    }
    return {field: value for field, value in metadata.items() if value}


def run_fields(env: Mapping[str, str]) -> dict[str, Any]:
    """What a key's and a budget's request both carry besides their caps: the run's metadata
    and namespace, and the constraints when given."""
    fields: dict[str, Any] = {"metadata": run_metadata(env)}
    namespace = present(env.get("KEYBRAKE_WORKFLOW_NAMESPACE"))
    if namespace:
        fields["namespace"] = namespace
    given = constraints(env)
    if given is not None:
        fields["constraints"] = given
    return fields


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
    return {**body, **run_fields(env)}


def build_budget_request(env: Mapping[str, str]) -> dict[str, Any]:
    """The POST /vault/budgets body, from the step's environment."""
    body: dict[str, Any] = {
        "agent_run_label": required(env, "KEYBRAKE_LABEL", "the run label, argo/<workflow>"),
        "expires_in": required(env, "KEYBRAKE_EXPIRES_IN", "a duration such as 6h"),
        **caps(env, ("daily_usd_cap", "total_usd_cap")),
    }
    if "daily_usd_cap" not in body and "total_usd_cap" not in body:
        raise InputError("give total_usd_cap (the run's whole life) and/or daily_usd_cap")
    return {**body, **run_fields(env)}


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


def describe_constraints(held: Any) -> str:
    """`, constrained by customers, currencies` for the constraints the proxy says it holds
    (the request's, or an issuer's it inherited), or nothing."""
    if not isinstance(held, dict):
        return ""
    fields = sorted(str(name) for name in held if name != "mode")
    report = " (report only)" if held.get("mode") == "report" else ""
    return f", constrained by {', '.join(fields)}{report}" if fields else ""


def request_id(env: Mapping[str, str], body: Mapping[str, Any]) -> str:
    """What every retry of this step sends as its Idempotency-Key: the template's request id
    (the run's uid and the task name), else one derived from the run and the request itself."""
    given = present(env.get("KEYBRAKE_REQUEST_ID"))
    if given:
        return given[:255]
    canonical = json.dumps(body, sort_keys=True).encode()
    uid = present(env.get("KEYBRAKE_WORKFLOW_UID")) or "no-uid"
    return f"{uid}/{hashlib.sha256(canonical).hexdigest()[:16]}"


class SecretRefused(Exception):
    """The Kubernetes API refused to create the run's key Secret."""


def kubernetes(env: Mapping[str, str]) -> tuple[str, str, ssl.SSLContext]:
    """The API server's URL, this pod's token for it, and the cluster CA, as Kubernetes gives
    every pod (KUBERNETES_SERVICE_HOST/PORT, and the service-account mount)."""
    host = present(env.get("KUBERNETES_SERVICE_HOST"))
    port = present(env.get("KUBERNETES_SERVICE_PORT")) or "443"
    folder = present(env.get("KEYBRAKE_KUBE_DIR"))
    if not host or not folder:
        raise InputError(
            "delivery secret needs the Kubernetes API (KUBERNETES_SERVICE_HOST and the "
            "service-account mount); use delivery parameter outside a cluster"
        )
    try:
        with open(os.path.join(folder, "token"), encoding="utf-8") as source:
            token = source.read().strip()
        context = ssl.create_default_context(cafile=os.path.join(folder, "ca.crt"))
    except (OSError, ssl.SSLError) as exc:
        raise InputError(
            f"cannot read this pod's service-account token and CA in {folder} ({exc}); is "
            "automountServiceAccountToken off?"
        ) from exc
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}", token, context


def secret_name(env: Mapping[str, str], request: str) -> str:
    """`keybrake-<workflow uid>-<8 hex of the request id>`: one per issue step of the run."""
    uid = (present(env.get("KEYBRAKE_WORKFLOW_UID")) or "run").lower()
    uid = "".join(c for c in uid if c.isalnum() or c == "-")[:63] or "run"
    return f"keybrake-{uid}-{hashlib.sha256(request.encode()).hexdigest()[:8]}"


def _label(value: str) -> str:
    """A valid label value: at most 63 of [A-Za-z0-9-_.], starting and ending alphanumeric."""
    kept = "".join(c if c.isalnum() or c in "-_." else "-" for c in value)[:63]
    return kept.strip("-_.") or "unknown"


def store_in_secret(
    env: Mapping[str, str],
    key_id: str,
    vault_key: str,
    request: str,
    sleep: Callable[[float], None],
) -> str:
    """Create the run's Secret holding the key; its name. A name taken by an earlier attempt of
    this step (whose key the proxy has just revoked) gets the next suffix: this pod may create
    Secrets, and nothing more (Kubernetes cannot grant `create` by name)."""
    api, token, context = kubernetes(env)
    namespace = present(env.get("KEYBRAKE_WORKFLOW_NAMESPACE"))
    workflow = present(env.get("KEYBRAKE_WORKFLOW_NAME"))
    uid = present(env.get("KEYBRAKE_WORKFLOW_UID"))
    if not namespace:
        raise InputError("KEYBRAKE_WORKFLOW_NAMESPACE is empty (the workflow's namespace)")
    base = secret_name(env, request)
    metadata: dict[str, Any] = {
        "labels": {
            "app.kubernetes.io/managed-by": "keybrake",
            "keybrake.dev/workflow": _label(workflow),
            "keybrake.dev/key-id": _label(key_id),
        },
    }
    if workflow and uid:
        # Deleted with the Workflow; blockOwnerDeletion false needs no rights on Workflows.
        metadata["ownerReferences"] = [
            {
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Workflow",
                "name": workflow,
                "uid": uid,
                "blockOwnerDeletion": False,
            }
        ]
    url = f"{api}/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}/secrets"
    for attempt in range(1, 11):
        name = base if attempt == 1 else f"{base}-{attempt}"
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {**metadata, "name": name},
            "stringData": {"vault_key": vault_key},
        }
        status, answer = call_proxy("POST", url, token, secret, sleep, context=context)
        if 200 <= status < 300:
            return name
        if status != 409:
            raise SecretRefused(f"HTTP {status}: {error_message(answer) or 'no message'}")
    raise SecretRefused(f"Secrets {base} to {base}-10 all exist already")


def write_outputs(output_dir: str, outputs: Mapping[str, str]) -> None:
    os.makedirs(output_dir, exist_ok=True)
    for name, value in outputs.items():
        with open(os.path.join(output_dir, name), "w", encoding="utf-8") as out:
            out.write(value)


def main(env: Mapping[str, str] = os.environ, sleep: Callable[[float], None] = time.sleep) -> int:
    budget = present(env.get("KEYBRAKE_ISSUE")) == "budget"
    what = "a budget" if budget else "a vault key"
    delivery = present(env.get("KEYBRAKE_DELIVERY")) or "secret"
    try:
        proxy = required(env, "KEYBRAKE_URL", "the proxy_url input").rstrip("/")
        token, context = credentials(env)
        output_dir = required(env, "KEYBRAKE_OUTPUT_DIR", "where the outputs are written")
        body = build_budget_request(env) if budget else build_request(env)
        if not budget and delivery not in ("secret", "parameter"):
            raise InputError(f"KEYBRAKE_DELIVERY must be secret or parameter, got {delivery!r}")
        if not budget and delivery == "secret":
            kubernetes(env)  # before issuing: a key nobody can deliver is not issued
    except InputError as exc:
        print(f"keybrake: cannot issue {what}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    path = "/vault/budgets" if budget else "/vault/keys"
    request = request_id(env, body)
    try:
        status, answer = call_proxy(
            "POST",
            f"{proxy}{path}",
            token,
            body,
            sleep,
            headers={"Idempotency-Key": request},
            context=context,
        )
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
    if budget:
        outputs = {"budget_id": str(answer.get("budget_id", ""))}
    else:
        outputs = {
            "key_id": str(answer.get("key_id", "")),
            "vault_key": str(answer.get("vault_key", "")),
        }
    if not all(outputs.values()):
        print(f"keybrake: the proxy answered without {', '.join(outputs)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    issued = outputs.get("key_id") or outputs["budget_id"]
    if not budget and delivery == "secret":
        vault_key = outputs.pop("vault_key")
        try:
            outputs["vault_key_secret"] = store_in_secret(env, issued, vault_key, request, sleep)
        except (SecretRefused, InputError, Unavailable) as exc:
            # Nobody can use the key: take it back now rather than at the end of the run.
            with_id = f"{proxy}/vault/keys/{urllib.parse.quote(issued, safe='')}"
            with contextlib.suppress(Unavailable):
                call_proxy("DELETE", with_id, token, None, sleep, context=context)
            print(
                f"keybrake: issued {issued} but could not store it in a Secret of the run "
                f"({exc}); revoked it. The issue step's service account needs `create` on "
                "Secrets in this namespace (templates/rbac/keybrake-issuer.yaml)",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE if isinstance(exc, Unavailable) else EXIT_REFUSED
    try:
        write_outputs(output_dir, outputs)
    except OSError as exc:
        print(
            f"keybrake: issued {issued} but could not write the step outputs ({exc}); "
            f"the exit handler revokes it by label {body['agent_run_label']}",
            file=sys.stderr,
        )
        return 1
    caps_shown = describe(answer) or describe(body)
    held = describe_constraints(answer.get("constraints", body.get("constraints")))
    if budget:
        detail = f"caps {caps_shown}{held}"
    else:
        on = f", on budget {body['budget_id']}" if "budget_id" in body else ""
        into = f", in Secret {outputs['vault_key_secret']}" if "vault_key_secret" in outputs else ""
        detail = (
            f"for {body['vendor']}: {caps_shown or 'no caps of its own'}{on}, "
            f"endpoints {', '.join(body['allowed_endpoints'])}{held}{into}"
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
