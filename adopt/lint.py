"""`keybrake lint`: the spend risks of Argo workflows, as findings. Each rule is one function
below; docs/lint.md says what each finds, why it matters, and how to fix or silence it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap

from keybrake.adopt.credentials import (
    INTERNAL_ANNOTATION,
    Heuristic,
    credential_uses,
)
from keybrake.adopt.workflows import (
    FAN_OUT,
    Document,
    FanOut,
    Skipped,
    Unreadable,
    Workflow,
    line_of,
    load_paths,
)
from keybrake.proxy.vendor_facts import VENDOR_FACTS, VENDOR_NAMES

__all__ = [
    "DEFAULT_SEVERITY",
    "RULES",
    "SEVERITIES",
    "Finding",
    "Report",
    "Rule",
    "lint_paths",
]

SEVERITIES = ("high", "medium", "low", "info")  # most severe first
IGNORE_ANNOTATION = "keybrake.dev/lint-ignore"
KEYBRAKE_TEMPLATES = ("keybrake-vault-key", "keybrake-fanout")
LIBRARY_KINDS = ("WorkflowTemplate", "ClusterWorkflowTemplate")  # what templateRef can call


def _either(names: tuple[str, ...]) -> str:
    """("stripe", "twilio", "resend") -> "Stripe, Twilio or Resend"."""
    shown = [name.capitalize() for name in names]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


_PROXIED = _either(VENDOR_NAMES)  # the vendors keybrake proxies, as findings name them
_EXAMPLE_KEY = VENDOR_FACTS[VENDOR_NAMES[0]].sdk.key  # a key variable KB107 shows as example


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    name: str
    summary: str
    fix: str


RULES = {
    rule.id: rule
    for rule in (
        Rule(
            "KB101",
            "vendor-secret-in-pod",
            f"A template's pods read a {_PROXIED} credential from a Kubernetes Secret: every "
            "pod holds the full-access key, with no cap on what it moves.",
            "Issue a capped vault key at the head of the run (keybrake-vault-key `issue`) and "
            "give the pods that instead (`keybrake wrap` does both).",
        ),
        Rule(
            "KB102",
            "retry-repeats-side-effects",
            "A template holding a vendor credential retries application failures, so a charge "
            "or message that failed after the vendor acted is sent again.",
            "Retry system errors only (`retryPolicy: OnError`), or exit with a dedicated code "
            "on refusals and exclude it: `expression: asInt(lastRetry.exitCode) != 77`.",
        ),
        Rule(
            "KB103",
            "no-spend-cap",
            "The workflow's pods hold a vendor credential and no step issues a capped key: "
            "nothing limits what one run can spend.",
            "Add keybrake-vault-key's `issue` (or `budget`) step before the pods that spend.",
        ),
        Rule(
            "KB104",
            "no-revoke-on-exit",
            "The workflow issues a vault key but no exit handler revokes it: a failed or "
            "stopped run leaves a live key until it expires.",
            "Add `onExit` (or `hooks.exit`) running keybrake-vault-key's `revoke`.",
        ),
        Rule(
            "KB105",
            "unbounded-fanout",
            "A template holding a vendor credential is fanned out with no `parallelism`: "
            "hundreds of pods may call the vendor at once.",
            "Set `parallelism` on the template holding the fanning step (it bounds that "
            "template's children), or on the workflow.",
        ),
        Rule(
            "KB106",
            "key-in-parameters",
            "A vault key travels as a parameter, so it shows in `argo get` and the Workflow "
            "object, where Secret delivery keeps it out.",
            "Use `delivery: secret` (the default) and read the key from the per-run Secret.",
        ),
        Rule(
            "KB107",
            "uncappable-secret-in-pod",
            "A template's pods read a credential from a Kubernetes Secret that is no "
            f"{_PROXIED} key (a cloud, a code host, a database, another API): keybrake "
            "cannot cap it, so it is noted, never judged a spend risk.",
            "Keep the Secret to the pods that need it, with the narrowest scope its service "
            f"offers. A {_PROXIED} key lint cannot tell: name its Secret, key or variable after "
            f"the vendor ({_EXAMPLE_KEY}). A Secret of your own (a database password): list it "
            "under `internal_secrets` in .keybrake-lint.yaml.",
        ),
    )
}
# Each rule's usual severity (KB101 is high when fanned out, medium otherwise).
DEFAULT_SEVERITY = {
    "KB101": "medium",
    "KB102": "high",
    "KB103": "high",
    "KB104": "high",
    "KB105": "medium",
    "KB106": "info",
    "KB107": "low",
}


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    severity: str
    path: Path
    line: int
    workflow: str  # Kind/name
    template: str | None
    message: str
    # What in the template: the credential of KB101 and KB107 (its variable or header, else the
    # Secret and key), the fanning step of KB105, the parameter of KB106; "" for the others.
    subject: str = ""

    @property
    def name(self) -> str:
        return RULES[self.rule].name

    @property
    def fix(self) -> str:
        return RULES[self.rule].fix


@dataclass(slots=True)
class Report:
    findings: list[Finding] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    files: int = 0
    workflows: int = 0

    def at_or_above(self, threshold: str) -> list[Finding]:
        if threshold == "never":
            return []
        # info never fails a build: it is advice.
        limit = SEVERITIES.index(threshold)
        return [
            f
            for f in self.findings
            if f.severity != "info" and SEVERITIES.index(f.severity) <= limit
        ]


def _ignored(workflow: Workflow) -> set[str]:
    """`keybrake.dev/lint-ignore: "KB105, KB102:charge-batch"`: rules silenced for the whole
    document, or for one template."""
    text = workflow.annotations.get(IGNORE_ANNOTATION, "")
    return {part.strip() for part in text.split(",") if part.strip()}


def _retry_strategy(workflow: Workflow, template: CommentedMap) -> CommentedMap | None:
    for source in (
        template,
        workflow.spec.get("templateDefaults") or {},
        workflow.spec,
    ):
        strategy = source.get("retryStrategy") if isinstance(source, dict) else None
        if isinstance(strategy, CommentedMap):
            return strategy
    return None


def retries_application_failures(strategy: CommentedMap) -> str | None:
    """Why a retryStrategy repeats a failed call, or None when it does not."""
    policy = str(strategy.get("retryPolicy") or "OnFailure")  # Argo's default
    expression = str(strategy.get("expression") or "")
    if policy in ("OnError", "OnTransientError"):
        return None
    if "lastRetry.exitCode" in expression:
        return None  # taken to exclude the pod's refusal exit code (docs/lint.md)
    limit = strategy.get("limit")
    if str(limit).strip() == "0":
        return None  # no retry at all
    if limit is None:
        return f"retryStrategy without a limit retries {policy} forever"
    implied = "" if "retryPolicy" in strategy else " (Argo's default when only limit is set)"
    return f"retryPolicy {policy}{implied} retries up to {limit} times after the pod failed"


def _ref(call: CommentedMap) -> tuple[str, str] | None:
    ref = call.get("templateRef")
    if isinstance(ref, CommentedMap):
        return str(ref.get("name", "")), str(ref.get("template", ""))
    return None


def _source_text(template: CommentedMap) -> str:
    parts: list[str] = []
    script = template.get("script")
    if isinstance(script, CommentedMap):
        parts.append(str(script.get("source", "")))
    for key in ("container", "script"):
        container = template.get(key)
        if isinstance(container, CommentedMap):
            parts += [
                str(a) for a in (container.get("args") or []) + (container.get("command") or [])
            ]
    return "\n".join(parts)


def _issues(workflow: Workflow, template: CommentedMap) -> bool:
    """Issues a capped key: keybrake-vault-key's issue or budget, or an inline copy of it."""
    text = _source_text(template)
    return "/vault/keys" in text.replace("/vault/keys/revoke", "") or "/vault/budgets" in text


def _revokes(template: CommentedMap) -> bool:
    return "/vault/keys/revoke" in _source_text(template)


def _calls_matching(
    workflow: Workflow, start: str, ref_templates: tuple[str, ...], inline: Any
) -> bool:
    """Whether `start` (a template name), or any template it calls, is keybrake's
    `ref_templates` by templateRef or an inline template `inline` accepts."""
    for _name, template in workflow.reachable(start):
        if inline(template):
            return True
        for call in workflow.calls(template):
            ref = _ref(call)
            if ref and ref[0] in KEYBRAKE_TEMPLATES and ref[1] in ref_templates:
                return True
    return False


def _uses_keybrake_fanout(workflow: Workflow) -> bool:
    ref = workflow.spec.get("workflowTemplateRef")
    return isinstance(ref, CommentedMap) and ref.get("name") == "keybrake-fanout"


def _issues_anywhere(workflow: Workflow) -> bool:
    if _uses_keybrake_fanout(workflow):
        return True
    return any(
        _calls_matching(workflow, name, ("issue", "budget"), lambda t: _issues(workflow, t))
        for name in workflow.templates
    )


def _exit_revokes(workflow: Workflow) -> bool:
    if _uses_keybrake_fanout(workflow):
        return True
    handlers: list[CommentedMap | str] = []
    hooks = workflow.spec.get("hooks")
    exit_hook = hooks.get("exit") if isinstance(hooks, CommentedMap) else None
    if isinstance(workflow.spec.get("onExit"), str):
        # Argo runs onExit when both are set: hooks.exit then never runs.
        handlers.append(workflow.spec["onExit"])
    elif isinstance(exit_hook, CommentedMap):
        if isinstance(exit_hook.get("template"), str):
            handlers.append(exit_hook["template"])
        elif _ref(exit_hook):
            handlers.append(exit_hook)
    for handler in handlers:
        if isinstance(handler, str):
            if _calls_matching(workflow, handler, ("revoke",), _revokes):
                return True
        else:
            ref = _ref(handler)
            if ref and ref[0] in KEYBRAKE_TEMPLATES and ref[1] == "revoke":
                return True
    return False


def _vault_key_parameters(workflow: Workflow) -> Iterator[tuple[str, CommentedMap, str]]:
    """(template, parameter node, why) of each vault key passed as a parameter."""
    for name, template in workflow.templates.items():
        for call in workflow.calls(template):
            arguments = call.get("arguments")
            for parameter in (
                (arguments or {}).get("parameters") or [] if isinstance(arguments, dict) else []
            ):
                if not isinstance(parameter, CommentedMap):
                    continue
                value = str(parameter.get("value", ""))
                if parameter.get("name") == "delivery" and value == "parameter":
                    yield (
                        name,
                        parameter,
                        f"step {call.get('name')!r} issues with delivery: parameter",
                    )
                elif "outputs.parameters.vault_key}}" in value.replace(" ", ""):
                    yield name, parameter, f"parameter {parameter.get('name')!r} carries {value}"


@dataclass(frozen=True, slots=True)
class Libraries:
    """The linted WorkflowTemplates and ClusterWorkflowTemplates, as the runs calling them see
    them (templateRef, workflowTemplateRef)."""

    by_name: dict[str, Workflow]
    # (library, template) whose pods hold a credential of a vendor keybrake proxies, or read
    # the calling run's vault key — the template itself or any it runs, at any depth, here or
    # in another library.
    risky: set[tuple[str, str]]
    # (library, template) some linted file runs in a fan-out, at any depth.
    fanned: set[tuple[str, str]]


def _libraries(workflows: list[Workflow], heuristic: Heuristic) -> Libraries:
    by_name = {w.name: w for w in workflows if w.kind in LIBRARY_KINDS}
    risky = {
        (w.name, name)
        for w in by_name.values()
        for name, template in w.templates.items()
        if any(use.proxied for use in credential_uses(w, template, heuristic))
        # A wrapped library template reads the calling run's vault key: the run must issue it.
        or _reads_run_key(template)
    }

    def reaches_risky(w: Workflow, start: str) -> bool:
        return any(
            (w.name, name) in risky or any(ref in risky for _, ref in w.refs_of(template))
            for name, template in w.reachable(start)
        )

    changed = True
    while changed:  # a library template calling another library's, which calls a third's, ...
        changed = False
        for w in by_name.values():
            for name in w.templates:
                if (w.name, name) not in risky and reaches_risky(w, name):
                    risky.add((w.name, name))
                    changed = True
    # A template referenced from a fanning step, or from a template a fan-out runs, is fanned
    # out, and so is everything it runs.
    stack = [
        ref
        for w in workflows
        for holder, node, ref in w.refs()
        if any(key in node for key in FAN_OUT) or holder in w.fan_outs()
    ]
    fanned: set[tuple[str, str]] = set()
    while stack:
        ref = stack.pop()
        library = by_name.get(ref[0])
        if ref in fanned or library is None:
            continue
        fanned.add(ref)
        for name, template in library.reachable(ref[1]):
            stack.append((library.name, name))
            stack += [inner for _, inner in library.refs_of(template)]
    return Libraries(by_name, risky, fanned)


class _Linter:
    def __init__(self, heuristic: Heuristic, libraries: Libraries) -> None:
        self.heuristic = heuristic
        self.libraries = libraries

    def lint(self, workflow: Workflow) -> list[Finding]:
        findings: list[Finding] = []
        ignored = _ignored(workflow)
        path = workflow.document.path

        def add(
            rule: str,
            line: int,
            template: str | None,
            message: str,
            subject: str,
            severity: str | None = None,
        ) -> None:
            severity = severity or DEFAULT_SEVERITY[rule]
            if rule in ignored or (template and f"{rule}:{template}" in ignored):
                return
            findings.append(
                Finding(rule, severity, path, line, workflow.title, template, message, subject)
            )

        def add_run(rule: str, message: str) -> None:
            """A finding about the whole run, reported at its spec."""
            add(rule, line_of(workflow.document.body, "spec"), None, message, "")

        reported_fans: set[tuple[str, int]] = set()

        def unbounded_fan(template: str, what: str) -> None:
            """KB105 for the first fan-out running `template` with no bound: a template's own
            parallelism bounds what it runs, not how many times it is run, so each level of a
            fan-out needs a bound on its holder (or the workflow's)."""
            fan: FanOut | None = next(
                (f for f in workflow.fans_reaching(template) if not workflow.bounded(f.holder)),
                None,
            )
            if fan is None or (template, id(fan.call)) in reported_fans:
                return
            reported_fans.add((template, id(fan.call)))
            how = next(k for k in FAN_OUT if k in fan.call)
            add(
                "KB105",
                line_of(fan.call),
                template,
                f"{what}fanned out by {fan.holder!r} step {fan.call.get('name')!r} ({how}) "
                f"with no parallelism on {fan.holder!r} or on the workflow",
                str(fan.call.get("name", "")),
            )

        fan_outs = workflow.fan_outs()
        held: list[str] = []  # what the run holds of a proxied vendor's credentials
        for name, template in workflow.templates.items():
            uses = credential_uses(workflow, template, self.heuristic)
            fanned = name in fan_outs or (workflow.name, name) in self.libraries.fanned
            for use in uses:
                if use.proxied:
                    spread = (
                        "fanned out, so every pod of the fan-out holds it"
                        if fanned
                        else "one pod holds it"
                    )
                    add(
                        "KB101",
                        use.line,
                        name,
                        f"{use.vendor} credential from {use.describe()}; {spread}",
                        use.subject,
                        severity="high" if fanned else "medium",
                    )
                else:
                    vendor = f"{use.vendor} " if use.vendor else ""
                    add(
                        "KB107",
                        use.line,
                        name,
                        f"{vendor}credential from {use.describe()}: no {_PROXIED} key by its "
                        "names, so keybrake cannot cap it",
                        use.subject,
                    )
            if not any(use.proxied for use in uses):
                continue
            held.append(name)
            strategy = _retry_strategy(workflow, template)
            why = retries_application_failures(strategy) if strategy is not None else None
            if strategy is not None and why:
                add(
                    "KB102",
                    line_of(strategy) or line_of(template),
                    name,
                    f"{why}, and the pod holds a vendor credential: a call the vendor completed "
                    "before the pod failed is made again",
                    "",
                )
            unbounded_fan(name, "")
        # A template of a linted library that holds (or runs) a credential, run by templateRef:
        # from a step or task, or as a template of this workflow that is itself a templateRef.
        for holder, node, ref in workflow.refs():
            if ref not in self.libraries.risky:
                continue
            held.append(f"{ref[0]}/{ref[1]} (templateRef)")
            how = next((k for k in FAN_OUT if k in node), None)
            if how is None:
                unbounded_fan(
                    holder,
                    f"runs {ref[0]}/{ref[1]} (templateRef), which holds a vendor credential, ",
                )
            elif not workflow.bounded(holder):
                add(
                    "KB105",
                    line_of(node),
                    holder,
                    f"step {node.get('name')!r} fans out {ref[0]}/{ref[1]} ({how}), which "
                    "holds a vendor credential, with no parallelism on this template or the "
                    "workflow",
                    str(node.get("name", "")),
                )
        # The whole run is a linted WorkflowTemplate's (workflowTemplateRef).
        target = self._workflow_template(workflow)
        if target is not None:
            entry = workflow.spec.get("entrypoint") or target.spec.get("entrypoint")
            if (target.name, str(entry)) in self.libraries.risky:
                held.append(f"{target.name}/{entry} (workflowTemplateRef)")
        runs = workflow.kind in ("Workflow", "CronWorkflow") or "entrypoint" in workflow.spec
        issues = _issues_anywhere(workflow) or (target is not None and _issues_anywhere(target))
        if runs and held and not issues:
            add_run(
                "KB103",
                f"templates {', '.join(sorted(set(held)))} hold vendor credentials (or read the "
                "run's vault key) and no step issues a capped vault key",
            )
        revokes = _exit_revokes(workflow) or (target is not None and _exit_revokes(target))
        if runs and issues and not revokes:
            add_run("KB104", "a vault key is issued but no onExit or hooks.exit handler revokes it")
        for name, parameter, why in _vault_key_parameters(workflow):
            add(
                "KB106",
                line_of(parameter),
                name,
                why,
                str(parameter.get("name", "")),
            )
        return findings

    def _workflow_template(self, workflow: Workflow) -> Workflow | None:
        """The linted WorkflowTemplate a run refers to whole (`workflowTemplateRef`)."""
        ref = workflow.spec.get("workflowTemplateRef")
        if not isinstance(ref, CommentedMap):
            return None
        target = self.libraries.by_name.get(str(ref.get("name")))
        return target if target is not workflow else None


def _reads_run_key(template: CommentedMap) -> bool:
    """A template whose pods read a vault key the run issues (a global of `keybrake wrap`)."""
    return "{{workflow.outputs.parameters.keybrake_" in json.dumps(template, default=str)


def _internal_secrets(documents: list[Document]) -> set[str]:
    """Secrets among the linted files annotated `keybrake.dev/internal: "true"`."""
    found = set()
    for document in documents:
        body = document.body
        if body.get("kind") == "Secret" and isinstance(body.get("metadata"), dict):
            metadata = body["metadata"]
            annotations = metadata.get("annotations")
            marked = isinstance(annotations, dict) and annotations.get(INTERNAL_ANNOTATION)
            if str(marked).lower() == "true":
                found.add(str(metadata.get("name")))
    return found


def lint_paths(paths: list[Path], internal: set[str] | None = None) -> Report:
    documents, skipped, unreadable = load_paths(paths)
    report = Report(skipped=skipped, unreadable=unreadable)
    report.files = len({d.path for d in documents})
    heuristic = Heuristic((internal or set()) | _internal_secrets(documents), uncappable=True)
    workflows = [w for d in documents if (w := Workflow.of(d)) is not None]
    report.workflows = len(workflows)
    linter = _Linter(heuristic, _libraries(workflows, heuristic))
    for workflow in workflows:
        try:
            report.findings += linter.lint(workflow)
        except Exception as exc:
            report.unreadable.append(
                Unreadable(
                    workflow.document.path,
                    f"{workflow.title}: a field has a shape Argo does not accept "
                    f"({type(exc).__name__}: {exc})",
                )
            )
    report.findings.sort(key=lambda f: (str(f.path), f.line, f.rule))
    return report
