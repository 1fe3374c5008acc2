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
    CredentialUse,
    Heuristic,
    credential_uses,
)
from keybrake.adopt.workflows import (
    FAN_OUT,
    Document,
    Skipped,
    Unreadable,
    Workflow,
    line_of,
    load_paths,
)

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
            "A template's pods read a third-party API credential from a Kubernetes Secret: "
            "every pod holds the full-access key, with no cap on what it moves.",
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
}
_SEVERITY_OF = {
    "KB102": "high",
    "KB103": "high",
    "KB104": "high",
    "KB105": "medium",
    "KB106": "info",
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


class _Linter:
    def __init__(
        self,
        heuristic: Heuristic,
        external_fan_outs: set[tuple[str, str]],
        library_risks: dict[tuple[str, str], int],
    ) -> None:
        self.heuristic = heuristic
        self.external_fan_outs = external_fan_outs
        # (WorkflowTemplate, template) holding vendor credentials, in the linted files: a run
        # calling one by templateRef holds them too.
        self.library_risks = library_risks

    def lint(self, workflow: Workflow) -> list[Finding]:
        findings: list[Finding] = []
        ignored = _ignored(workflow)
        path = workflow.document.path

        def add(rule: str, severity: str, line: int, template: str | None, message: str) -> None:
            if rule in ignored or (template and f"{rule}:{template}" in ignored):
                return
            findings.append(Finding(rule, severity, path, line, workflow.title, template, message))

        fan_outs = workflow.fan_outs()
        risky: dict[str, list[CredentialUse]] = {}
        for name, template in workflow.templates.items():
            uses = credential_uses(workflow, template, self.heuristic)
            if not uses:
                continue
            risky[name] = uses
            fanned = name in fan_outs or (workflow.name, name) in self.external_fan_outs
            for use in uses:
                spread = (
                    "fanned out, so every pod of the fan-out holds it"
                    if fanned
                    else "one pod holds it"
                )
                vendor = f"{use.vendor} " if use.vendor else ""
                add(
                    "KB101",
                    "high" if fanned else "medium",
                    use.line,
                    name,
                    f"{vendor}credential from {use.describe()}; {spread}",
                )
            strategy = _retry_strategy(workflow, template)
            why = retries_application_failures(strategy) if strategy is not None else None
            if strategy is not None and why:
                add(
                    "KB102",
                    _SEVERITY_OF["KB102"],
                    line_of(strategy) or line_of(template),
                    name,
                    f"{why}, and the pod holds a vendor credential: a call the vendor completed "
                    "before the pod failed is made again",
                )
            # A template's own parallelism bounds what it runs, not how many times it is run:
            # each level of a fan-out needs a bound on its holder (or the workflow's).
            for fan in workflow.fans_reaching(name):
                if not workflow.bounded(fan.holder):
                    how = next(k for k in FAN_OUT if k in fan.call)
                    add(
                        "KB105",
                        _SEVERITY_OF["KB105"],
                        line_of(fan.call),
                        name,
                        f"fanned out by {fan.holder!r} step {fan.call.get('name')!r} ({how}) "
                        f"with no parallelism on {fan.holder!r} or on the workflow",
                    )
                    break
        held = sorted(risky)
        for holder_name, holder in list(workflow.templates.items()):
            for call in workflow.calls(holder):
                ref = _ref(call)
                if ref is None or ref not in self.library_risks:
                    continue
                held.append(f"{ref[0]}/{ref[1]} (templateRef)")
                fanned = any(key in call for key in FAN_OUT)
                if fanned and not workflow.bounded(holder_name):
                    how = next(k for k in FAN_OUT if k in call)
                    add(
                        "KB105",
                        _SEVERITY_OF["KB105"],
                        line_of(call),
                        holder_name,
                        f"step {call.get('name')!r} fans out {ref[0]}/{ref[1]} ({how}), which "
                        "holds a vendor credential, with no parallelism on this template or the "
                        "workflow",
                    )
        runs = workflow.kind in ("Workflow", "CronWorkflow") or "entrypoint" in workflow.spec
        issues = _issues_anywhere(workflow)
        if runs and held and not issues:
            add(
                "KB103",
                _SEVERITY_OF["KB103"],
                line_of(workflow.document.body, "spec"),
                None,
                f"templates {', '.join(held)} hold vendor credentials (or read the run's vault "
                "key) and no step issues a capped vault key",
            )
        if runs and issues and not _exit_revokes(workflow):
            add(
                "KB104",
                _SEVERITY_OF["KB104"],
                line_of(workflow.document.body, "spec"),
                None,
                "a vault key is issued but no onExit or hooks.exit handler revokes it",
            )
        for name, parameter, why in _vault_key_parameters(workflow):
            add("KB106", _SEVERITY_OF["KB106"], line_of(parameter), name, why)
        return findings


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
    heuristic = Heuristic((internal or set()) | _internal_secrets(documents))
    workflows = [w for d in documents if (w := Workflow.of(d)) is not None]
    report.workflows = len(workflows)
    # A template fanned out from another file (templateRef with withItems/withParam) is fanned
    # out wherever it is defined.
    external = {
        (str(ref.get("name")), str(ref.get("template")))
        for workflow in workflows
        for call, ref in workflow.template_refs()
        if any(key in call for key in FAN_OUT)
    }
    libraries = {
        (workflow.name, name): len(uses)
        for workflow in workflows
        if workflow.kind in ("WorkflowTemplate", "ClusterWorkflowTemplate")
        for name, template in workflow.templates.items()
        if (uses := credential_uses(workflow, template, heuristic))
        # A wrapped library template reads the calling run's vault key: the run must issue it.
        or _reads_run_key(template)
    }
    linter = _Linter(heuristic, external, libraries)
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
