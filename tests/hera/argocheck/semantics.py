"""The reference checks Argo's schemas lack, done the way the controller's validation and
substitution would see them.

- `spec.entrypoint` and `spec.onExit` name templates of the document;
- every DAG task / step names a template that exists, locally or through `templateRef` in the
  catalog (WorkflowTemplates, or ClusterWorkflowTemplates with `clusterScope: true`), passes only
  parameters the target declares and every one it requires;
- `depends` / `dependencies` name tasks of the same DAG, without cycles;
- every `{{...}}` is a variable Argo defines where it is used: `{{tasks.X.outputs.parameters.Y}}`
  needs X among the task's ancestors and Y among X's outputs, `{{inputs.parameters.Z}}` a declared
  input, `{{workflow.parameters.P}}` a workflow argument, `{{workflow.outputs.parameters.G}}` a
  `globalName` somewhere in the run, `{{item}}` a loop, `{{pod.name}}` a pod template;
- expression tags (`{{=...}}`) name only such variables and call only sprig's or expr's functions;
- retry expressions only use the `lastRetry` fields Argo provides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

_VARIABLE = re.compile(r"\{\{(.*?)\}\}", re.S)
_NODE_RESULTS = {
    "Succeeded", "Failed", "Errored", "Skipped", "Omitted", "Daemoned", "AnySucceeded",
    "AllFailed",
}  # fmt: skip
_DEPENDS_TOKEN = re.compile(r"\s*(&&|\|\||!|\(|\)|[A-Za-z0-9][-A-Za-z0-9_]*(?:\.[A-Za-z]+)?)")
_WORKFLOW_SCALARS = {
    "name", "namespace", "uid", "serviceAccountName", "mainEntrypoint", "status", "failures",
    "duration", "priority", "creationTimestamp", "scheduledTime", "labels.json",
    "annotations.json", "parameters.json", "parameters",
}  # fmt: skip
_NODE_FIELDS = {"id", "ip", "status", "exitCode", "startedAt", "finishedAt", "hostNodeName"}
_LAST_RETRY = {"exitCode", "status", "duration", "message"}
# Expression tags: `a['b']` is read as `a.b`, string literals are blanked, then every dotted
# name is either a call (followed by `(`) or a variable.
_INDEX = re.compile(r"\[\s*'([^']*)'\s*\]")
_STRING_LITERAL = re.compile(r"'[^']*'|\"[^\"]*\"")
_EXPRESSION_NAME = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_][-\w]*)*)\s*(\()?")
_EXPR_FUNCTIONS = {"asInt", "asFloat", "jsonpath", "toJson", "len", "int", "float"}
_EXPR_WORDS = {"nil", "true", "false", "and", "or", "not", "in", "matches", "contains"}
_POD_KINDS = ("container", "script", "resource", "containerSet", "data", "http", "plugin")


def variables(value: Any) -> Iterator[str]:
    """Every `{{...}}` tag in the strings of `value`, stripped."""
    if isinstance(value, str):
        for match in _VARIABLE.finditer(value):
            yield match.group(1).strip()
    elif isinstance(value, dict):
        for item in value.values():
            yield from variables(item)
    elif isinstance(value, list):
        for item in value:
            yield from variables(item)


def parse_depends(expression: str) -> list[str]:
    """Task names in an Argo `depends` expression; ValueError when it does not parse."""
    names, position = [], 0
    while position < len(expression):
        match = _DEPENDS_TOKEN.match(expression, position)
        if not match:
            if expression[position:].strip() == "":
                break
            raise ValueError(f"cannot parse depends {expression!r} at {expression[position:]!r}")
        token = match.group(1)
        position = match.end()
        if token in {"&&", "||", "!", "(", ")"}:
            continue
        name, _, result = token.partition(".")
        if result and result not in _NODE_RESULTS:
            raise ValueError(f"unknown task result .{result} in depends {expression!r}")
        names.append(name)
    return names


@dataclass
class Catalog:
    """The documents a run can reference by `templateRef`."""

    documents: list[dict[str, Any]] = field(default_factory=list)

    def find(self, name: str, cluster_scope: bool) -> dict[str, Any] | None:
        kind = "ClusterWorkflowTemplate" if cluster_scope else "WorkflowTemplate"
        for document in self.documents:
            if document.get("kind") == kind and document["metadata"].get("name") == name:
                return document
        return None


def _templates(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in document.get("spec", {}).get("templates", [])}


def _params(section: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((section or {}).get("parameters") or [])


@dataclass
class _Scope:
    """Which variables are defined at one place of a template."""

    where: str
    inputs: set[str]
    pod: bool = False
    loop: bool = False
    retry: bool = False
    sibling_kind: str = ""  # "tasks" or "steps"
    visible_siblings: set[str] = field(default_factory=set)


class Checker:
    def __init__(self, document: dict[str, Any], catalog: Catalog | None = None) -> None:
        self.document = document
        self.catalog = catalog or Catalog([document])
        self.templates = _templates(document)
        self.problems: list[str] = []
        self.workflow_parameters = {p["name"] for p in _params(document["spec"].get("arguments"))}
        self.global_outputs = self._global_outputs()

    # -- lookups ---------------------------------------------------------------------------------
    def _global_outputs(self) -> set[str]:
        names: set[str] = set()
        documents = [self.document]
        for template in self.templates.values():
            for ref in self._template_refs(template):
                target = self.catalog.find(ref["name"], bool(ref.get("clusterScope")))
                if target is not None:
                    documents.append(target)
        for document in documents:
            for template in _templates(document).values():
                for parameter in _params(template.get("outputs")):
                    if parameter.get("globalName"):
                        names.add(parameter["globalName"])
        return names

    @staticmethod
    def _template_refs(template: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for node in _invocations(template):
            if "templateRef" in node:
                yield node["templateRef"]
            for hook in (node.get("hooks") or {}).values():
                if "templateRef" in hook:
                    yield hook["templateRef"]

    def target(self, node: dict[str, Any], where: str) -> dict[str, Any] | None:
        """The template a task, step or hook runs, or None (reported)."""
        if "template" in node:
            found = self.templates.get(node["template"])
            if found is None:
                self.problems.append(f"{where}: template {node['template']!r} does not exist")
            return found
        if "templateRef" in node:
            ref = node["templateRef"]
            document = self.catalog.find(ref["name"], bool(ref.get("clusterScope")))
            kind = "ClusterWorkflowTemplate" if ref.get("clusterScope") else "WorkflowTemplate"
            if document is None:
                self.problems.append(f"{where}: templateRef to unknown {kind} {ref['name']!r}")
                return None
            found = _templates(document).get(ref["template"])
            if found is None:
                self.problems.append(
                    f"{where}: {kind} {ref['name']!r} has no template {ref['template']!r}"
                )
            return found
        if "inline" in node:
            return dict(node["inline"])
        self.problems.append(f"{where}: names no template")
        return None

    # -- checks ----------------------------------------------------------------------------------
    def run(self) -> list[str]:
        spec = self.document["spec"]
        for key in ("entrypoint", "onExit"):
            if key in spec and spec[key] not in self.templates:
                self.problems.append(f"spec.{key}: template {spec[key]!r} does not exist")
        self.check_variables(spec.get("arguments"), _Scope("spec.arguments", set()))
        for name, template in self.templates.items():
            self.check_template(name, template)
        return self.problems

    def check_template(self, name: str, template: dict[str, Any]) -> None:
        where = f"templates.{name}"
        inputs = {p["name"] for p in _params(template.get("inputs"))}
        is_pod = any(kind in template for kind in _POD_KINDS)
        has_retry = "retryStrategy" in template
        self.check_variables(template.get("inputs"), _Scope(f"{where}.inputs", set()))
        scope = _Scope(where, inputs, pod=is_pod, retry=has_retry)
        retry = template.get("retryStrategy") or {}
        for identifier in re.findall(r"lastRetry\.(\w+)", retry.get("expression", "")):
            if identifier not in _LAST_RETRY:
                self.problems.append(f"{where}.retryStrategy: unknown lastRetry.{identifier}")
        nested = "dag" in template or "steps" in template
        skipped = {"inputs", "dag", "steps"} | ({"outputs"} if nested else set())
        rest = {k: v for k, v in template.items() if k not in skipped}
        self.check_variables(rest, scope)
        if nested:
            # A DAG's or steps template's outputs may read its own tasks' or steps' outputs.
            kind = "tasks" if "dag" in template else "steps"
            children = (
                [t["name"] for t in template["dag"].get("tasks", [])]
                if kind == "tasks"
                else [s["name"] for group in template["steps"] for s in group]
            )
            self.check_variables(
                template.get("outputs"),
                _Scope(
                    f"{where}.outputs",
                    inputs,
                    sibling_kind=kind,
                    visible_siblings=set(children),
                ),
            )
        if "dag" in template:
            self.check_dag(where, template["dag"], inputs)
        if "steps" in template:
            self.check_steps(where, template["steps"], inputs)

    def check_call(self, node: dict[str, Any], where: str, scope: _Scope) -> None:
        target = self.target(node, where)
        passed = {p["name"] for p in _params(node.get("arguments"))}
        if target is not None:
            declared = {p["name"]: p for p in _params(target.get("inputs"))}
            for name in sorted(passed - set(declared)):
                self.problems.append(f"{where}: passes {name!r}, which the template does not take")
            for name, parameter in declared.items():
                if name not in passed and "default" not in parameter and "value" not in parameter:
                    self.problems.append(f"{where}: does not pass required input {name!r}")
        checked = {k: v for k, v in node.items() if k not in {"name", "hooks"}}
        self.check_variables(checked, scope)
        for hook_name, hook in (node.get("hooks") or {}).items():
            hook_scope = _Scope(
                f"{where}.hooks.{hook_name}",
                scope.inputs,
                loop=scope.loop,
                sibling_kind=scope.sibling_kind,
                visible_siblings=scope.visible_siblings | {node["name"]},
            )
            self.check_call(dict(hook, name=node["name"]), hook_scope.where, hook_scope)

    def check_dag(self, where: str, dag: dict[str, Any], inputs: set[str]) -> None:
        tasks = {t["name"]: t for t in dag.get("tasks", [])}
        if len(tasks) != len(dag.get("tasks", [])):
            self.problems.append(f"{where}: duplicate task names")
        parents: dict[str, list[str]] = {}
        for name, task in tasks.items():
            try:
                named = parse_depends(task.get("depends", "")) + list(task.get("dependencies", []))
            except ValueError as exc:
                self.problems.append(f"{where}.tasks.{name}: {exc}")
                named = []
            for parent in named:
                if parent not in tasks:
                    problem = f"depends on unknown task {parent!r}"
                    self.problems.append(f"{where}.tasks.{name}: {problem}")
            parents[name] = [p for p in named if p in tasks and p != name]
        ancestors = {name: _ancestors(name, parents) for name in tasks}
        for name, found in ancestors.items():
            if name in found:
                self.problems.append(f"{where}.tasks.{name}: depends on itself (a cycle)")
        if "target" in dag:
            for target in dag["target"].split():
                if target not in tasks:
                    self.problems.append(f"{where}.target: unknown task {target!r}")
        for name, task in tasks.items():
            scope = _Scope(
                f"{where}.tasks.{name}",
                inputs,
                loop=any(k in task for k in ("withItems", "withParam", "withSequence")),
                sibling_kind="tasks",
                visible_siblings=ancestors[name] - {name},
            )
            self.check_call(task, scope.where, scope)

    def check_steps(self, where: str, groups: list[list[dict[str, Any]]], inputs: set[str]) -> None:
        earlier: set[str] = set()
        for index, group in enumerate(groups):
            for step in group:
                scope = _Scope(
                    f"{where}.steps[{index}].{step['name']}",
                    inputs,
                    loop=any(k in step for k in ("withItems", "withParam", "withSequence")),
                    sibling_kind="steps",
                    visible_siblings=set(earlier),
                )
                self.check_call(step, scope.where, scope)
            earlier |= {step["name"] for step in group}

    # -- variables ---------------------------------------------------------------------------------
    def check_variables(self, value: Any, scope: _Scope) -> None:
        for variable in variables(value):
            problem = self.undefined(variable, scope)
            if problem:
                self.problems.append(f"{scope.where}: {{{{{variable}}}}} {problem}")

    def undefined(self, variable: str, scope: _Scope) -> str | None:
        """None when Argo defines `variable` in `scope`, else why not."""
        if variable.startswith("="):
            return self._expression_tag(variable[1:], scope)
        parts = variable.split(".")
        head = parts[0]
        if head == "workflow":
            return self._workflow_variable(parts[1:])
        if head == "inputs":
            if parts[1:2] == ["parameters"]:
                if len(parts) == 2:
                    return None
                if len(parts) == 3 and parts[2] in scope.inputs:
                    return None
                return "is not a declared input parameter"
            if parts[1:2] == ["artifacts"] and len(parts) in (3, 4):
                return None
            return "is not an inputs variable Argo defines"
        if head == "outputs":
            return None if len(parts) >= 3 and parts[1] in ("parameters", "artifacts") else "?"
        if head == "item":
            return None if scope.loop else "is used outside withItems/withParam"
        if variable in ("pod.name", "node.name"):
            return None if scope.pod else "is only defined in a pod's template"
        if variable in ("retries", "lastRetry.exitCode"):
            return None if scope.retry else "needs a retryStrategy"
        if head in ("tasks", "steps"):
            return self._node_variable(parts, scope)
        return "is not a variable Argo defines"

    def _expression_tag(self, source: str, scope: _Scope) -> str | None:
        """An expression tag (`{{=...}}`) is checked by the variables it names: each must be
        defined where the tag is used, as a plain tag would have to be. Functions must be sprig's
        or expr's builtins that Argo provides."""
        text = _STRING_LITERAL.sub('""', _INDEX.sub(r".\1", source))
        for match in _EXPRESSION_NAME.finditer(text):
            name, called = match.group(1), bool(match.group(2))
            if called:
                if not (name.startswith("sprig.") or name in _EXPR_FUNCTIONS):
                    return f"(expression tag) calls {name}(), which Argo does not provide"
                continue
            if name in _EXPR_WORDS:
                continue
            problem = self.undefined(name, scope)
            if problem:
                return f"(expression tag) names {name}, which {problem}"
        return None

    def _workflow_variable(self, rest: list[str]) -> str | None:
        joined = ".".join(rest)
        if joined in _WORKFLOW_SCALARS or (rest and rest[0] == "creationTimestamp"):
            return None
        if len(rest) == 2 and rest[0] in ("labels", "annotations"):
            return None
        if len(rest) == 2 and rest[0] == "parameters":
            if rest[1] in self.workflow_parameters:
                return None
            return "is not a workflow argument (spec.arguments.parameters)"
        if len(rest) == 3 and rest[:2] == ["outputs", "parameters"]:
            if rest[2] in self.global_outputs:
                return None
            return "is no output parameter's globalName in this run"
        if len(rest) == 3 and rest[:2] == ["outputs", "artifacts"]:
            return None
        return "is not a workflow variable Argo defines"

    def _node_variable(self, parts: list[str], scope: _Scope) -> str | None:
        if len(parts) < 3:
            return "is incomplete"
        kind, node_name = parts[0], parts[1]
        if kind != scope.sibling_kind:
            return f"refers to {kind} outside a {kind[:-1]}"
        if node_name not in scope.visible_siblings:
            return f"refers to {node_name!r}, which is not an ancestor ({kind} run before it)"
        rest = parts[2:]
        if len(rest) == 1 and rest[0] in _NODE_FIELDS:
            return None
        if rest[:1] != ["outputs"]:
            return "is not a node variable Argo defines"
        node = self._sibling(scope, node_name)
        target = self.target(node, scope.where) if node is not None else None
        if rest == ["outputs", "result"]:
            if target is not None and not any(k in target for k in ("script", "container")):
                return "reads .outputs.result of a template that is neither script nor container"
            return None
        if rest == ["outputs", "parameters"]:
            return None
        if len(rest) == 3 and rest[1] in ("parameters", "artifacts"):
            if target is None:
                return None  # already reported
            declared = {p["name"] for p in (target.get("outputs") or {}).get(rest[1]) or []}
            if rest[2] in declared:
                return None
            return f"names output {rest[2]!r}, which {node_name!r} does not declare"
        return "is not a node variable Argo defines"

    def _sibling(self, scope: _Scope, name: str) -> dict[str, Any] | None:
        template_name = scope.where.split(".")[1]
        template = self.templates.get(template_name, {})
        if scope.sibling_kind == "tasks":
            nodes: Iterable[dict[str, Any]] = (template.get("dag") or {}).get("tasks", [])
        else:
            nodes = [step for group in template.get("steps") or [] for step in group]
        for node in nodes:
            if node.get("name") == name:
                return node
        return None


def _invocations(template: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from (template.get("dag") or {}).get("tasks", [])
    for group in template.get("steps") or []:
        yield from group


def _ancestors(name: str, parents: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(parents.get(name, []))
    while stack:
        parent = stack.pop()
        if parent in seen:
            continue
        seen.add(parent)
        stack.extend(parents.get(parent, []))
    return seen


def problems(document: dict[str, Any], catalog: Catalog | None = None) -> list[str]:
    """Every reference problem of `document`; [] when Argo would resolve everything."""
    return Checker(document, catalog).run()
