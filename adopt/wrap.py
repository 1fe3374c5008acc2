"""`keybrake wrap`: rewrite an Argo workflow into the vault-key pattern, keeping everything else.

For each vendor whose Secret its pods read (Stripe, Twilio, Resend), the run issues one capped
vault key first (keybrake-vault-key's `issue`, by templateRef), the pods get that key in the same
environment variable instead of the Secret's, plus the vendor's base-URL variable, each call
tagged with its item and pod; retries stop repeating refused or failed calls; and an exit handler
revokes the keys after the workflow's own exit handler, whatever that one's outcome. A key lives
until the run ends (the exit handler revokes it, `keybrake reaper` should that not run): its
`expires_in` is the workflow's `activeDeadlineSeconds` when set, else the proxy's longest key
life, unless told (`expires_in`). Constraints (whom the calls may pay or message), when given,
go to what holds the run's cap: its one key, or with several vendors its budget. What each key
may call, spend, is held to and how long it lives is said (`Wrapped.keys`), with a warning when
the endpoints are wrap's default ones.

The file is changed in its text, at the places the YAML parser read each changed node from
(`_yaml_edit.SourceEditor`): every byte outside what wrap inserts or rewrites stays as it was,
whatever the file's indentation, flow collections, comments, block scalars, anchors or line
endings (`Wrapped.edits` lists each change). What it cannot rewrite safely it refuses
(`WrapError`, exit 2), naming the template and why. Wrapping a wrapped file changes nothing.
"""

from __future__ import annotations

import difflib
import io
import itertools
import json
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString as Quoted

from keybrake.adopt._yaml_edit import EditConflict, SourceEditor, fresh, positioned_yaml
from keybrake.adopt.credentials import CredentialUse, Heuristic, credential_uses
from keybrake.adopt.workflows import (
    FAN_OUT,
    Document,
    Workflow,
    load_documents,
    yaml_round_trip,
)
from keybrake.adopt.yaml_bound import TooManyAliasNodes
from keybrake.hera_workflows.retry import EXIT_REFUSED
from keybrake.proxy.constraints import FIELDS, VENDOR_FIELDS, parse_constraints
from keybrake.proxy.endpoints import EndpointPattern
from keybrake.proxy.errors import KeybrakeError
from keybrake.proxy.money import parse_duration
from keybrake.proxy.vendor_facts import RESEND, STRIPE, TWILIO, VENDOR_FACTS, VENDOR_NAMES

__all__ = [
    "CODE_CHANGES",
    "DEFAULT_ENDPOINTS",
    "WrapError",
    "WrapOptions",
    "Wrapped",
    "wrap_text",
]

SUPPORTED = VENDOR_NAMES
TEMPLATES = "keybrake-vault-key"  # the shipped ClusterWorkflowTemplate (templates/)
DEFAULT_PROXY = "http://keybrake.keybrake.svc.cluster.local:8080"
# What a key may call unless told (--allow): the vendor's usual spending call.
DEFAULT_ENDPOINTS = {vendor.name: list(vendor.usual_endpoints) for vendor in VENDOR_FACTS.values()}
BASE_URL_VARIABLE = {vendor.name: vendor.sdk.base_url for vendor in VENDOR_FACTS.values()}
# The one change each vendor's SDK needs, and no more than that: resend-python reads its base
# URL from the environment; stripe-python and twilio take it only in code. Then each call runs
# through the pod helper (`_POD_HELPER`), which reads keybrake's answers from the SDK's exception
# (twilio's keeps no headers, so its client is watched for a rate limit's Retry-After).
_THROUGH_THE_HELPER = "then run each call through keybrake_pod"
CODE_CHANGES = {
    STRIPE.name: (
        "stripe-python takes its base URL only in code: after `import stripe`, add "
        f'`stripe.api_base = os.environ["{STRIPE.sdk.base_url}"]` (with `StripeClient`, pass '
        f'`base_addresses={{"api": os.environ["{STRIPE.sdk.base_url}"]}}` instead); '
        f"{_THROUGH_THE_HELPER}: `keybrake_pod.call(stripe.PaymentIntent.create, amount=..., "
        "currency=...)`."
    ),
    TWILIO.name: (
        "twilio takes its base URL only in code: after `client = Client(...)`, add "
        f'`client.api.base_url = os.environ["{TWILIO.sdk.base_url}"]` and '
        f"`keybrake_pod.watch(client)`; {_THROUGH_THE_HELPER}: "
        "`keybrake_pod.call(client.messages.create, to=..., from_=..., body=...)`."
    ),
    RESEND.name: (
        f"resend-python reads {RESEND.sdk.base_url} from the environment by itself; "
        f"{_THROUGH_THE_HELPER}: `keybrake_pod.call(resend.Emails.send, {{...}})`."
    ),
}
# keybrake.hera_workflows.keybrake_pod, which exits with this on a refusal.
_POD_HELPER_EXIT = EXIT_REFUSED
_POD_HELPER = (
    "keybrake_pod is one standard-library file to put beside the pods' code "
    "(`python -m keybrake.hera_workflows.keybrake_pod > keybrake_pod.py`, then `import "
    "keybrake_pod`): a call run through it waits out keybrake's rate limits (Retry-After) and "
    f"is sent again, and the pod exits {_POD_HELPER_EXIT} when keybrake refuses it (a cap hit; a "
    "key, endpoint or constraint refused)"
)


def _pod_helper_note(refusal_exit_code: int | None) -> str:
    """What wrap says of the pod helper, and of the retries it asks for."""
    if refusal_exit_code == _POD_HELPER_EXIT:
        return f"{_POD_HELPER}."
    told = "" if refusal_exit_code is None else f" (not {refusal_exit_code})"
    return (
        f"{_POD_HELPER}: wrap with --refusal-exit-code {_POD_HELPER_EXIT}{told} so that Argo "
        "retries the pods' other failures and never a refusal."
    )


# Argo drops an argument its template does not declare: a keybrake-vault-key installed before
# the `constraints` input would issue the keys without them.
_CONSTRAINTS_NEED_THE_TEMPLATES = (
    f"the constraints reach the proxy through the installed {TEMPLATES}'s `constraints` input, "
    "which Argo drops, without an error, from a keybrake-vault-key installed before it had one "
    "(the keys would then be issued without them): apply this release's templates/ (`kubectl "
    "apply -f templates/clusterworkflowtemplates/`, or templates/workflowtemplates/ with "
    "--namespaced) first, or wrap with --inline."
)


class WrapError(KeybrakeError):
    """What cannot be converted safely, and why (exit 2)."""


@dataclass(slots=True)
class WrapOptions:
    budget_usd: Decimal
    vendor: str = "auto"  # auto, stripe, twilio, resend
    max_usd_per_pod: Decimal | None = None
    refusal_exit_code: int | None = None
    allow: list[str] = field(default_factory=list)  # endpoints; empty: DEFAULT_ENDPOINTS
    proxy_url: str = DEFAULT_PROXY
    internal_secrets: set[str] = field(default_factory=set)
    # The keybrake steps copied into the workflow instead of templateRef to the installed
    # keybrake-vault-key (for a cluster where it is not installed).
    inline: bool = False
    # templateRef the namespaced WorkflowTemplate (templates/workflowtemplates/) instead of the
    # ClusterWorkflowTemplate, for clusters that allow no cluster-scoped templates.
    namespaced: bool = False
    # The keys' (and a budget's) life, a duration such as 6h; None: until the run ends.
    expires_in: str | None = None
    # Whom the run's calls may pay or message, as `keybrake keys issue --constraint` sends them
    # ({"customers": ["cus_1"], "mode": "report"}): given to what holds the run's cap, its one
    # key or (several vendors) its budget. None: none.
    constraints: dict[str, Any] | None = None


@dataclass(slots=True)
class Wrapped:
    text: str
    changed: bool
    vendors: list[str]  # vendors whose keys the run now issues
    notes: list[str]  # what a reviewer should know (templateRef fan-outs, code changes)
    # Per key the run issues: its vendor, what it may call, its caps and its life.
    keys: list[str] = field(default_factory=list)
    # What may make the run fail: default endpoints, a life shorter than the run's deadline.
    warnings: list[str] = field(default_factory=list)
    # Each change, as (start, end, text): the input's span [start, end) replaced by text.
    edits: list[tuple[int, int, str]] = field(default_factory=list)

    def diff(self, original: str, name: str) -> str:
        return "".join(
            difflib.unified_diff(
                original.splitlines(keepends=True),
                self.text.splitlines(keepends=True),
                fromfile=f"a/{name}",
                tofile=f"b/{name}",
            )
        )


def _usd(value: Decimal) -> str:
    return format(value.normalize(), "f")


_SHOWN = [vendor.capitalize() for vendor in VENDOR_NAMES]
_PROXIED = ", ".join(_SHOWN[:-1]) + " or " + _SHOWN[-1]  # Stripe, Twilio or Resend


def _vendor_of(
    use: CredentialUse, template: str, options: WrapOptions, heuristic: Heuristic
) -> str:
    """The vendor whose vault key replaces a credential: the one its names say (its Secret, key
    and variable, each read with lint's knowledge of vendors' names), else --vendor; never for a
    credential any of whose names says another vendor's."""
    named = {v for v in (heuristic.vendor_of(n) for n in (use.secret, use.key, use.env)) if v}
    proxied = f"keybrake proxies {_PROXIED.replace(' or ', ' and ')} only"
    others = sorted(named - set(SUPPORTED))
    if others:
        # --vendor never makes another vendor's credential (its names say whose) a vault key.
        raise WrapError(
            f"template {template}: {use.describe()} is a {' and '.join(others)} credential; "
            f"{proxied}: convert this template by hand, leaving that credential as it is"
        )
    if len(named) > 1:
        raise WrapError(
            f"template {template}: {use.describe()}: its names say {' and '.join(sorted(named))} "
            "both: name its Secret, key and variable after its one vendor"
        )
    if named:
        vendor = named.pop()
        if options.vendor not in ("auto", vendor):
            raise WrapError(
                f"template {template}: {use.describe()} is a {vendor} credential, not "
                f"{options.vendor} (--vendor)"
            )
        return vendor
    if options.vendor in SUPPORTED:
        return options.vendor
    raise WrapError(
        f"template {template}: {use.describe()} is a credential of a vendor wrap cannot tell "
        f"from its names; {proxied}: if this is a {_PROXIED} credential, name its vendor with "
        f"--vendor ({' or '.join(VENDOR_NAMES)}); if it is another vendor's, convert this "
        "template by hand; a Secret of your own (a database password): list it under "
        "internal_secrets in .keybrake-lint.yaml"
    )


def _item_parameter(workflow: Workflow, template: str) -> str | None:
    """The input parameter carrying the fan-out's item, so a pod's calls are tagged with it
    (a per-pod cap then follows the item through Argo's retries)."""
    fan = workflow.fan_outs().get(template)
    if fan is None or fan.call.get("template") != template:
        return None
    arguments = fan.call.get("arguments")
    parameters = arguments.get("parameters") if isinstance(arguments, dict) else None
    for parameter in parameters or []:
        if isinstance(parameter, dict) and "{{item" in str(parameter.get("value", "")):
            return str(parameter.get("name"))
    return None


def _tag(workflow: Workflow, name: str) -> str:
    """What a template's pods append to the vault key: the fan-out's item (hashed) and the pod."""
    item = _item_parameter(workflow, name)
    if not item:
        return "{{pod.name}}"
    # Argo's expressions read a hyphenated name only as inputs.parameters['a-b'].
    reference = (
        f"inputs.parameters.{item}" if item.isidentifier() else f"inputs.parameters['{item}']"
    )
    return f"{{{{=sprig.trunc(12, sprig.sha256sum({reference}))}}}}@{{{{pod.name}}}}"


Step = tuple[Any, Any]  # (a mapping or a sequence, its key or index)


def _container_steps(template: CommentedMap, role: str) -> list[Step]:
    """The way from a template to one of its containers, a (parent, key or index) a step."""
    if role == "main":
        return [(template, "container" if template.get("container") else "script")]
    kind, _, name = role.partition(":")
    key = {"init": "initContainers", "sidecar": "sidecars"}.get(kind)
    steps: list[Step] = [(template, key)] if key else []
    if key is None:
        container_set = template.get("containerSet")
        steps = [(template, "containerSet"), (container_set, "containers")]
    parent, slot = steps[-1]
    items = parent.get(slot) if isinstance(parent, dict) else None
    for index, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, CommentedMap) and str(item.get("name")) == name:
            return [*steps, (items, index)]
    raise WrapError(f"template {template.get('name')}: container {role} not found")


def _at(steps: list[Step]) -> Any:
    parent, slot = steps[-1]
    return parent[slot]


def _container(template: CommentedMap, role: str) -> CommentedMap:
    found = _at(_container_steps(template, role))
    if not isinstance(found, CommentedMap):
        raise WrapError(f"template {template.get('name')}: container {role} not found")
    return found


def _env_entry(container: CommentedMap, name: str) -> CommentedMap | None:
    env = container.get("env")
    for entry in env if isinstance(env, list) else []:
        if isinstance(entry, CommentedMap) and str(entry.get("name")) == name:
            return entry
    return None


def _entry_steps(template: CommentedMap, use: CredentialUse) -> list[Step] | None:
    """The way from a template to the env entry of a credential (None: not in an env list)."""
    steps = _container_steps(template, use.container)
    container = _at(steps)
    env = container.get("env") if isinstance(container, CommentedMap) else None
    if not isinstance(env, CommentedSeq):
        return None
    entry = _env_entry(container, str(use.env))
    if entry is None:
        return None
    index = next(i for i, e in enumerate(env) if e is entry)
    return [*steps, (container, "env"), (env, index)]


def _raw_variable(vendor: str) -> str:
    return f"KEYBRAKE_VAULT_KEY_{vendor.upper()}_RAW"


def _unshare(
    workflow: Workflow,
    risky: dict[str, list[tuple[CredentialUse, str]]],
    editor: SourceEditor,
) -> None:
    """An env entry two templates share by a YAML alias (the same entry, env list or container)
    holds one value: when their pods tag the key differently (a fanned-out template with its
    item, a plain one with its pod only), each template whose tag is not the one written at the
    anchor gets its own copy in place of its alias, so it is rewritten with its own tag."""
    holders: dict[int, list[tuple[str, CredentialUse]]] = {}
    for name, uses in risky.items():
        for use, _vendor in uses:
            steps = _entry_steps(workflow.templates[name], use)
            if steps is not None:
                holders.setdefault(id(_at(steps)), []).append((name, use))
    for shared, group in holders.items():
        tags = {name: _tag(workflow, name) for name, _use in group}
        if len(set(tags.values())) < 2:
            continue
        # The tag written at the anchor: that of a template reaching the entry through no alias.
        owners = [
            name
            for name, use in group
            if not any(
                editor.aliased(*step) for step in _entry_steps(workflow.templates[name], use) or []
            )
        ]
        kept = tags[(owners or [group[0][0]])[0]]
        for name, use in group:
            steps = _entry_steps(workflow.templates[name], use) or []
            if tags[name] == kept or not steps or id(_at(steps)) != shared:
                continue  # the anchor's own tag, or already given its own copy
            step = next((step for step in steps if editor.aliased(*step)), None)
            if step is None:
                others = ", ".join(sorted({n for n, _ in group} - {name}))
                raise WrapError(
                    f"{workflow.title} template {name}: shares the entry of ${use.env} with "
                    f"templates {others} by a YAML merge key (`<<`), and their pods tag the "
                    "vault key differently: write it out in each, or convert them by hand"
                )
            parent, slot = step
            editor.replace(parent, slot, fresh(parent[slot]))


def _rewrite_template(
    workflow: Workflow,
    name: str,
    uses: list[tuple[CredentialUse, str]],
    options: WrapOptions,
    editor: SourceEditor,
) -> None:
    template = workflow.templates[name]
    tag = _tag(workflow, name)
    for use, vendor in uses:
        container = _container(template, use.container)
        env = container.get("env")
        if use.env is None or not isinstance(env, CommentedSeq):
            raise WrapError(f"template {name}: the credential is not in an env list")
        entry = _env_entry(container, use.env)
        if entry is None:
            raise WrapError(f"template {name}: env {use.env!r} not found")
        raw = _raw_variable(vendor)
        if _env_entry(container, raw) is None:
            # Before the variables that expand it: Kubernetes expands $(VAR) only from earlier
            # entries.
            editor.insert(
                env,
                next(i for i, e in enumerate(env) if e is entry),
                CommentedMap(
                    name=raw,
                    valueFrom=CommentedMap(
                        secretKeyRef=CommentedMap(
                            name=Quoted(
                                f"{{{{workflow.outputs.parameters.keybrake_{vendor}_vault_key_secret}}}}"
                            ),
                            key="vault_key",
                        )
                    ),
                ),
            )
        if "valueFrom" in entry:  # an entry shared by a YAML alias is rewritten once
            editor.replace_pair(entry, "valueFrom", "value", Quoted(f"$({raw}).{tag}"))
        base = BASE_URL_VARIABLE[vendor]
        url = f"{options.proxy_url.rstrip('/')}/{vendor}"
        existing = _env_entry(container, base)
        if existing is None:
            editor.append(env, CommentedMap(name=base, value=url))
        elif existing.get("value") != url:
            # Pointing anywhere else, the pods would send the vault key past the proxy.
            if "valueFrom" in existing:
                editor.replace_pair(existing, "valueFrom", "value", url)
            else:
                editor.set(existing, "value", url)
    _retry_safely(workflow, template, options, editor)


def _retry_safely(
    workflow: Workflow, template: CommentedMap, options: WrapOptions, editor: SourceEditor
) -> None:
    """An unmodified pod cannot tell a refusal from a failure: retry system errors only, unless
    told the exit code it uses for refusals."""
    strategy = template.get("retryStrategy")
    if not isinstance(strategy, CommentedMap):
        inherited = (workflow.spec.get("templateDefaults") or {}).get("retryStrategy") or (
            workflow.spec.get("retryStrategy")
        )
        if not isinstance(inherited, dict):
            return
        strategy = fresh(inherited)  # its own copy: no YAML alias to the default
        editor.set(template, "retryStrategy", strategy)
    policy = str(strategy.get("retryPolicy") or "")
    if policy in ("OnError", "OnTransientError"):
        pass  # already retries nothing the pod did
    elif options.refusal_exit_code is not None:
        # Failures other than refusals are retried: the proxy answers a repeated identical call
        # within its dedupe window from its record instead of charging again.
        refusal = f"asInt(lastRetry.exitCode) != {options.refusal_exit_code}"
        editor.set(strategy, "retryPolicy", "Always")
        existing = strategy.get("expression")
        if existing and refusal not in str(existing):
            editor.set(strategy, "expression", f"({existing}) && {refusal}")
        elif not existing:
            editor.set(strategy, "expression", refusal)
    else:
        editor.set(strategy, "retryPolicy", "OnError")
    if "limit" not in strategy:
        editor.set(strategy, "limit", 3)


def _call(step: str, options: WrapOptions) -> CommentedMap:
    """How a task reaches keybrake's `issue`, `budget` or `revoke`: by templateRef, or the copy
    inlined as `keybrake-<step>`."""
    if options.inline:
        return CommentedMap(template=f"keybrake-{step}")
    reference = CommentedMap(name=TEMPLATES, template=step)
    if not options.namespaced:
        reference["clusterScope"] = True
    return CommentedMap(templateRef=reference)


def _inline_templates(steps: list[str]) -> list[CommentedMap]:
    """keybrake-vault-key's templates as the renderer makes them (what templates/ holds)."""
    from keybrake.hera_workflows.published import vault_key

    yaml = yaml_round_trip()
    out = io.StringIO()
    yaml.dump(vault_key().to_dict(), out)
    document = yaml.load(out.getvalue())
    found = {t["name"]: t for t in document["spec"]["templates"]}
    copies = []
    for step in steps:
        template = found[step]
        template["name"] = f"keybrake-{step}"
        copies.append(template)
    return copies


def _constraints_argument(options: WrapOptions) -> list[CommentedMap]:
    """The `constraints` argument of the step holding the run's cap, when there are any: an
    argument the installed template does not declare would be dropped, so none otherwise."""
    if not options.constraints:
        return []
    return [CommentedMap(name="constraints", value=json.dumps(options.constraints))]


def _check_constraints(workflow: Workflow, vendors: list[str], options: WrapOptions) -> None:
    """Each constrained field is one the run's calls are checked against: a key's constraints
    must be of its vendor (the proxy refuses the key otherwise), and a budget's field of no
    vendor of the run would check nothing."""
    for name in sorted(set(options.constraints or {}) & set(FIELDS)):
        if not any(name in VENDOR_FIELDS[vendor] for vendor in vendors):
            of = [v for v in VENDOR_NAMES if name in VENDOR_FIELDS[v]]
            raise WrapError(
                f"--constraint {name}: a constraint of {' and '.join(of)} calls, "
                f"and the pods of {workflow.title} call {' and '.join(vendors)} only"
            )


def _said_constraints(vendor: str, options: WrapOptions) -> str:
    """What the constraints hold `vendor`'s key to, for the line wrap says of it."""
    held = [
        f"{name} {', '.join(values)}"
        for name, values in (options.constraints or {}).items()
        if name in VENDOR_FIELDS[vendor]
    ]
    if not held:
        return ""
    if (options.constraints or {}).get("mode") == "report":
        outside = "the proxy forwards any other call and audits it as a would-be refusal"
    else:
        outside = "the proxy refuses (403) any other call"
    return f"; its calls are held to {' and '.join(held)} (--constraint): {outside}"


def _issue_template(vendor: str, options: WrapOptions, budget: bool, life: str) -> CommentedMap:
    endpoints = options.allow or DEFAULT_ENDPOINTS[vendor]
    arguments = [
        CommentedMap(name="vendor", value=vendor),
        CommentedMap(name="allowed_endpoints", value=json.dumps(endpoints)),
        # Always given: the issue step's own default (2h) would end the key mid-run. Drawing on
        # a budget, empty: the key lives as long as the budget.
        CommentedMap(name="expires_in", value=Quoted("") if budget else life),
        CommentedMap(name="request_id", value=Quoted(f"{{{{workflow.uid}}}}/keybrake-{vendor}")),
        CommentedMap(name="proxy_url", value=options.proxy_url),
    ]
    if budget:
        arguments.append(
            CommentedMap(name="budget_id", value=Quoted("{{inputs.parameters.budget_id}}"))
        )
    else:
        arguments.append(CommentedMap(name="total_usd_cap", value=Quoted(_usd(options.budget_usd))))
        arguments.extend(_constraints_argument(options))
    if options.max_usd_per_pod is not None:
        arguments.append(
            CommentedMap(name="max_usd_per_caller", value=Quoted(_usd(options.max_usd_per_pod)))
        )
    issue = CommentedMap(name="issue")
    issue.update(_call("issue", options))
    issue["arguments"] = CommentedMap(parameters=CommentedSeq(arguments))
    template = CommentedMap(name=f"keybrake-{vendor}-key")
    if budget:
        template["inputs"] = CommentedMap(parameters=CommentedSeq([CommentedMap(name="budget_id")]))
    template["dag"] = CommentedMap(tasks=CommentedSeq([issue]))
    # Global, so any pod of the run, at any depth, reads the key's Secret.
    template["outputs"] = CommentedMap(
        parameters=CommentedSeq(
            [
                CommentedMap(
                    name="vault_key_secret",
                    globalName=f"keybrake_{vendor}_vault_key_secret",
                    valueFrom=CommentedMap(
                        parameter=Quoted("{{tasks.issue.outputs.parameters.vault_key_secret}}")
                    ),
                ),
                CommentedMap(
                    name="key_id",
                    globalName=f"keybrake_{vendor}_key_id",
                    valueFrom=CommentedMap(
                        parameter=Quoted("{{tasks.issue.outputs.parameters.key_id}}")
                    ),
                ),
            ]
        )
    )
    return template


def _workflow_arguments(workflow: Workflow, template: CommentedMap) -> CommentedSeq:
    """What Argo gives a workflow's entrypoint or exit handler by itself, its inputs named like
    the workflow's arguments, passed on explicitly now that another template calls it."""
    arguments = workflow.spec.get("arguments")
    given = arguments.get("parameters") if isinstance(arguments, dict) else None
    names = {str(p.get("name")) for p in given or [] if isinstance(p, dict)}
    inputs = template.get("inputs")
    given_artifacts = arguments.get("artifacts") if isinstance(arguments, dict) else None
    artifact_names = {str(a.get("name")) for a in given_artifacts or [] if isinstance(a, dict)}
    wanted_artifacts = inputs.get("artifacts") if isinstance(inputs, dict) else None
    # An input artifact with its own source (http, s3, ...) needs nothing passed.
    if any(
        isinstance(a, dict) and str(a.get("name")) in artifact_names for a in wanted_artifacts or []
    ):
        raise WrapError(
            f"{workflow.title} template {template.get('name')}: takes input artifacts, which "
            "wrap cannot pass on from the workflow's arguments; convert it by hand"
        )
    wanted = inputs.get("parameters") if isinstance(inputs, dict) else None
    return CommentedSeq(
        [
            CommentedMap(
                name=str(p["name"]), value=Quoted(f"{{{{workflow.parameters.{p['name']}}}}}")
            )
            for p in wanted or []
            if isinstance(p, dict) and str(p.get("name")) in names
        ]
    )


def _main_template(
    workflow: Workflow,
    entry: str,
    vendors: list[str],
    options: WrapOptions,
    budget: bool,
    life: str,
) -> CommentedMap:
    tasks = CommentedSeq()
    if budget:
        step = CommentedMap(name="keybrake-budget")
        step.update(_call("budget", options))
        tasks.append(step)
        step.update(
            CommentedMap(
                arguments=CommentedMap(
                    parameters=CommentedSeq(
                        [
                            CommentedMap(
                                name="total_usd_cap", value=Quoted(_usd(options.budget_usd))
                            ),
                            CommentedMap(name="expires_in", value=life),
                            CommentedMap(
                                name="request_id", value=Quoted("{{workflow.uid}}/keybrake-budget")
                            ),
                            CommentedMap(name="proxy_url", value=options.proxy_url),
                            *_constraints_argument(options),
                        ]
                    )
                ),
            )
        )
    for vendor in vendors:
        task = CommentedMap(name=f"keybrake-{vendor}", template=f"keybrake-{vendor}-key")
        if budget:
            task["depends"] = "keybrake-budget"
            task["arguments"] = CommentedMap(
                parameters=CommentedSeq(
                    [
                        CommentedMap(
                            name="budget_id",
                            value=Quoted("{{tasks.keybrake-budget.outputs.parameters.budget_id}}"),
                        )
                    ]
                )
            )
        tasks.append(task)
    run = CommentedMap(
        name="run", template=entry, depends=" && ".join(f"keybrake-{v}" for v in vendors)
    )
    passed = _workflow_arguments(workflow, workflow.templates[entry])
    if passed:
        run["arguments"] = CommentedMap(parameters=passed)
    tasks.append(run)
    return CommentedMap(name="keybrake-main", dag=CommentedMap(tasks=tasks))


def _exit_template(
    workflow: Workflow, vendors: list[str], options: WrapOptions, budget: bool
) -> CommentedMap:
    """Runs the workflow's own exit handler first, then revokes each key (and the budget)
    whatever that one's outcome."""
    tasks = CommentedSeq()
    original: CommentedMap | None = None
    on_exit = workflow.spec.get("onExit")
    hooks = workflow.spec.get("hooks")
    exit_hook = hooks.get("exit") if isinstance(hooks, CommentedMap) else None
    if isinstance(on_exit, str):
        # Argo runs onExit when both are set: hooks.exit never ran, and stays as it is.
        original = CommentedMap(name="workflow-exit-handler", template=on_exit)
        handler = workflow.templates.get(on_exit)
        passed = _workflow_arguments(workflow, handler) if handler is not None else None
        if passed:
            original["arguments"] = CommentedMap(parameters=passed)
    elif isinstance(exit_hook, CommentedMap):
        original = CommentedMap(name="workflow-exit-handler")
        for key in ("template", "templateRef", "arguments"):
            if key in exit_hook:
                original[key] = exit_hook[key]
    if original is not None:
        tasks.append(original)
    after = (
        "workflow-exit-handler.Succeeded || workflow-exit-handler.Failed || "
        "workflow-exit-handler.Errored"
    )
    for index, vendor in enumerate(vendors):
        parameters = [
            CommentedMap(
                name="key_id",
                value=Quoted(f"{{{{workflow.outputs.parameters.keybrake_{vendor}_key_id}}}}"),
            ),
            CommentedMap(name="proxy_url", value=options.proxy_url),
        ]
        if budget and index == 0:
            parameters.append(
                CommentedMap(
                    name="budget_id",
                    value=Quoted("{{workflow.outputs.parameters.keybrake_budget_id}}"),
                )
            )
        task = CommentedMap(name=f"revoke-{vendor}")
        task.update(_call("revoke", options))
        task["arguments"] = CommentedMap(parameters=CommentedSeq(parameters))
        if original is not None:
            task["depends"] = after
        tasks.append(task)
    return CommentedMap(name="keybrake-exit", dag=CommentedMap(tasks=tasks))


@dataclass(slots=True)
class _Said:
    """What wrap tells of a file besides its text."""

    notes: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _seconds(duration: str) -> int:
    return int(parse_duration(duration).total_seconds())


def _duration(seconds: int) -> str:
    """A life as the issue step and the proxy take it (`1-9…` and a unit): 21600 is 6h."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _longest_key_life() -> int:
    """The proxy's longest key life unless its operator sets another (KEYBRAKE_MAX_TTL)."""
    from keybrake.proxy.settings import Settings  # pydantic: loaded only when a file is wrapped

    return _seconds(str(Settings.model_fields["max_ttl"].default))


def _checked_life(expires_in: str) -> int:
    """--expires-in as the proxy reads it, in seconds."""
    try:
        seconds = _seconds(expires_in)
    except ValueError as exc:
        raise WrapError(f"--expires-in: {exc}") from exc
    if seconds <= 0:
        raise WrapError(f"--expires-in {expires_in!r}: a key must live a while")
    return seconds


def _key_life(workflow: Workflow, options: WrapOptions, said: _Said) -> tuple[str, str]:
    """The run's keys' `expires_in`, and why that: they live until the run ends (the exit
    handler revokes them, the reaper should that not run), so as long as the run may last (its
    activeDeadlineSeconds), at most as long as the proxy lets a key live; or as told."""
    longest = _longest_key_life()
    value = workflow.spec.get("activeDeadlineSeconds")
    deadline = None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        deadline = value
    elif (
        isinstance(value, str)
        and value.strip().isascii()
        and value.strip().isdigit()
        and int(value) > 0
    ):
        deadline = int(value)
    elif value is not None:
        said.warnings.append(
            f"{workflow.title}: activeDeadlineSeconds {value!r} is no number of seconds wrap can "
            f"read: its keys live {_duration(longest)}, the proxy's longest key life; give "
            "--expires-in to bound them by the run's deadline"
        )
    if options.expires_in is not None:
        seconds = _checked_life(options.expires_in)
        if deadline is not None and seconds < deadline:
            said.warnings.append(
                f"{workflow.title}: --expires-in {_duration(seconds)} is shorter than the run's "
                f"activeDeadlineSeconds ({deadline}): its pods' calls after that are refused "
                "(401, the key expired)"
            )
        if seconds > longest:
            said.warnings.append(
                f"{workflow.title}: --expires-in {_duration(seconds)} is longer than the proxy's "
                f"longest key life ({_duration(longest)}) unless its KEYBRAKE_MAX_TTL allows it: "
                "the issue step is refused otherwise"
            )
        return _duration(seconds), "--expires-in"
    if deadline is not None and deadline < longest:
        return _duration(deadline), f"the run's activeDeadlineSeconds ({deadline})"
    return _duration(longest), (
        "the proxy's longest key life (KEYBRAKE_MAX_TTL by default; an issuer or a proxy "
        "allowing less refuses it: give --expires-in)"
    )


def _say_keys(
    workflow: Workflow, vendors: list[str], options: WrapOptions, life: tuple[str, str], said: _Said
) -> None:
    """Per key: its vendor, what it may call, its caps and its life; a warning when it may call
    wrap's default endpoints only."""
    budget = len(vendors) > 1
    expires_in, why = life
    for vendor in vendors:
        endpoints = options.allow or DEFAULT_ENDPOINTS[vendor]
        others = [v for v in vendors if v != vendor]
        caps = (
            f"draws on the run's budget of ${_usd(options.budget_usd)}, shared with the "
            f"{' and '.join(others)} key{'s' if len(others) > 1 else ''} (--budget-usd)"
            if budget
            else f"spends at most ${_usd(options.budget_usd)} in the run (--budget-usd)"
        )
        if options.max_usd_per_pod is not None:
            caps += f", ${_usd(options.max_usd_per_pod)} per fanned-out item (--max-usd-per-pod)"
        caps += _said_constraints(vendor, options)
        lives = (
            "lives until the run ends (keybrake-exit revokes it, keybrake reaper should that "
            "not run)"
        )
        holder = "the run's budget, and with it the key," if budget else "it"
        if why == "--expires-in":
            lives += f" or {expires_in} after issue (--expires-in), whichever comes first"
        else:
            lives += f"; {holder} expires after {expires_in} at most: {why}"
        said.keys.append(
            f"{workflow.title}: {vendor} key: may call {', '.join(endpoints)}; {caps}; {lives}"
        )
        if not options.allow:
            said.warnings.append(
                f"{workflow.title}: the {vendor} key may call {', '.join(endpoints)} only, "
                f"wrap's default ({vendor}'s usual spending call): the proxy refuses (403) every "
                f"other {vendor.capitalize()} endpoint the pods call; name each one with --allow "
                "'METHOD /path'"
            )


def _wrap_workflow(
    workflow: Workflow, options: WrapOptions, said: _Said, editor: SourceEditor
) -> list[str]:
    notes = said.notes
    heuristic = Heuristic(set(options.internal_secrets))
    for call, ref in workflow.template_refs():
        if any(key in call for key in FAN_OUT):
            notes.append(
                f"{workflow.title}: step {call.get('name')!r} fans out template "
                f"{ref.get('template')!r} of {ref.get('name')!r}, which lives in another file: "
                "wrap does not change it; give its pods the vault key there (keybrake lint shows "
                "where)"
            )
    risky: dict[str, list[tuple[CredentialUse, str]]] = {}
    for name, template in workflow.templates.items():
        uses = credential_uses(workflow, template, heuristic)
        if uses and "/" in name:
            raise WrapError(
                f"{workflow.title}: the inline template of step {name.split('/', 1)[1]!r} in "
                f"{name.split('/', 1)[0]!r} reads a vendor credential: move it into "
                "spec.templates (a named template) and wrap again"
            )
        for use in uses:
            if use.how == "http header":
                raise WrapError(
                    f"{workflow.title} template {name}: an HTTP template sends {use.describe()}; "
                    "Argo's agent makes that call, not a pod wrap can give a vault key: call "
                    "the vendor through the proxy from a container, or convert it by hand"
                )
            if use.how != "env" or use.env is None:
                raise WrapError(
                    f"{workflow.title} template {name}: {use.describe()} comes in by {use.how}; "
                    "wrap rewrites environment variables taken from a Secret key only: move it "
                    "to `env[].valueFrom.secretKeyRef`, or convert this template by hand"
                )
            risky.setdefault(name, []).append((use, _vendor_of(use, name, options, heuristic)))
    if not risky:
        return []
    if "entrypoint" not in workflow.spec:
        raise WrapError(
            f"{workflow.title} has no entrypoint (a library of templates): wrap the workflows "
            "that call it, and give its templates the vault key there"
        )
    vendors = sorted({vendor for uses in risky.values() for _, vendor in uses})
    if workflow.kind != "Workflow" and workflow.kind != "CronWorkflow":
        notes.append(
            f"{workflow.title}: its templates {', '.join(sorted(risky))} now read the vault key "
            "this template's own runs issue; a workflow calling them by templateRef must issue "
            "one too (keybrake lint KB103 reports those that do not)"
        )
    budget = len(vendors) > 1  # several vendors share one budget; one vendor's key holds it
    entry = str(workflow.spec["entrypoint"])
    if entry not in workflow.templates:
        raise WrapError(f"{workflow.title}: its entrypoint {entry!r} is no template of it")
    new = ["keybrake-main", "keybrake-exit", *(f"keybrake-{v}-key" for v in vendors)]
    if options.inline:
        new += ["keybrake-issue", "keybrake-revoke"] + (["keybrake-budget"] if budget else [])
    taken = sorted(set(new) & set(workflow.templates))
    if taken:
        raise WrapError(
            f"{workflow.title} already has templates {', '.join(taken)} (wrapped before, and "
            f"changed since?): templates {', '.join(sorted(risky))} still read vendor "
            "credentials; wrap the unwrapped file, or convert them by hand"
        )
    _check_constraints(workflow, vendors, options)
    life = _key_life(workflow, options, said)
    _unshare(workflow, risky, editor)
    for name, found in risky.items():
        _rewrite_template(workflow, name, found, options, editor)
    templates = workflow.spec["templates"]
    added = [_issue_template(vendor, options, budget, life[0]) for vendor in vendors]
    added.append(_main_template(workflow, entry, vendors, options, budget, life[0]))
    added.append(_exit_template(workflow, vendors, options, budget))
    if options.inline:
        added.extend(_inline_templates(["issue", "revoke"] + (["budget"] if budget else [])))
    for template in added:
        editor.append(templates, template)
    editor.set(workflow.spec, "entrypoint", "keybrake-main")
    hooks = workflow.spec.get("hooks")
    if (
        "onExit" not in workflow.spec
        and isinstance(hooks, CommentedMap)
        and isinstance(hooks.get("exit"), CommentedMap)
    ):
        editor.set(hooks, "exit", CommentedMap(template="keybrake-exit"))
    else:
        editor.set(workflow.spec, "onExit", "keybrake-exit", after="entrypoint")
    _say_keys(workflow, vendors, options, life, said)
    unbounded = [
        fan
        for name in risky
        for fan in workflow.fans_reaching(name)
        if not workflow.bounded(fan.holder)
    ]
    if unbounded:
        notes.append(
            f"{workflow.title}: step {unbounded[0].call.get('name')!r} of {unbounded[0].holder!r} "
            "fans out with no parallelism; consider `parallelism:` on that template (keybrake "
            "lint KB105)"
        )
    return vendors


def _indentation(text: str) -> tuple[int, int, int]:
    """The file's own block style, (mapping indent, sequence indent, dash offset): `key:\n- x`
    is (2, 2, 0), `key:\n  - x` (2, 4, 2); what wrap writes out whole (a new template, an env
    entry) is nested in it, where it goes lines up with its neighbours. Read from the first
    nested mapping and sequence outside block scalars."""
    mapping: int | None = None
    sequence: tuple[int, int] | None = None
    scalar_indent: int | None = None  # inside a block scalar (| or >) deeper than this
    lines = text.splitlines()
    for above, line in itertools.pairwise(lines):
        indent = len(line) - len(line.lstrip(" "))
        above_indent = len(above) - len(above.lstrip(" "))
        if scalar_indent is not None:
            if not line.strip() or indent > scalar_indent:
                continue
            scalar_indent = None
        stripped_above = above.split("#")[0].rstrip()
        if stripped_above.endswith(("|", ">", "|-", ">-", "|+", ">+")):
            scalar_indent = above_indent
            continue
        if not stripped_above.endswith(":") or not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("- "):
            if sequence is None and indent - above_indent in (0, 2, 4):
                offset = indent - above_indent
                item = line.lstrip()
                dash = len(item) - len(item[1:].lstrip())  # "- " is 2, "-   " is 4
                sequence = (offset + dash, offset)
        elif mapping is None and indent > above_indent:
            mapping = indent - above_indent
        if mapping is not None and sequence is not None:
            break
    seq, offset = sequence or (2, 0)
    return mapping or 2, seq, offset


def wrap_text(text: str, options: WrapOptions, path: Path | None = None) -> Wrapped:
    for endpoint in options.allow:
        try:
            EndpointPattern.parse(endpoint)
        except ValueError as exc:
            raise WrapError(f"--allow: {exc}") from exc
    if options.vendor not in ("auto", *SUPPORTED):
        raise WrapError(
            f"--vendor {options.vendor!r}: keybrake proxies {', '.join(SUPPORTED)} (or auto)"
        )
    if options.expires_in is not None:
        _checked_life(options.expires_in)
    if options.constraints is not None:
        try:
            parse_constraints(options.constraints)
        except ValueError as exc:
            raise WrapError(f"--constraint: {exc}") from exc
    yaml = positioned_yaml()
    try:
        documents = load_documents(text, yaml)
    except RecursionError as exc:
        raise WrapError("nested too deep to read") from exc
    except TooManyAliasNodes as exc:
        raise WrapError(str(exc)) from exc
    except YAMLError as exc:
        raise WrapError(f"not valid YAML: {str(exc).splitlines()[0]}") from exc
    editor = SourceEditor(text, yaml, _indentation(text))
    said = _Said()
    vendors: list[str] = []
    for index, body in enumerate(documents):
        if not isinstance(body, CommentedMap):
            continue
        workflow = Workflow.of(Document(path or Path("-"), index, body))
        if workflow is None:
            continue
        try:
            vendors += _wrap_workflow(workflow, options, said, editor)
        except WrapError:
            raise
        except EditConflict as exc:
            raise WrapError(f"{workflow.title}: cannot change it in place ({exc})") from exc
        except Exception as exc:
            raise WrapError(
                f"{workflow.title}: a field has a shape Argo does not accept "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    if not vendors:
        return Wrapped(text, False, [], said.notes, said.keys, said.warnings)
    try:
        edits = editor.edits()
    except EditConflict as exc:
        raise WrapError(f"cannot change it in place ({exc})") from exc
    for vendor in sorted(set(vendors)):
        said.notes.append(f"{vendor} pods: code change {CODE_CHANGES[vendor]}")
    said.notes.append(_pod_helper_note(options.refusal_exit_code))
    if options.constraints and not options.inline:
        said.notes.append(_CONSTRAINTS_NEED_THE_TEMPLATES)
    return Wrapped(
        editor.apply(edits),
        True,
        sorted(set(vendors)),
        said.notes,
        said.keys,
        said.warnings,
        [(edit.start, edit.end, edit.text) for edit in edits],
    )
