"""Argo workflow files as `keybrake lint` and `keybrake wrap` read them: YAML documents with
their line numbers, the four kinds that hold templates, and which templates a run fans out.

Read with ruamel.yaml's round-trip loader, so every mapping knows its line and `wrap` can write
the file back with its comments and key order; its aliases' expansion bounded (yaml_bound.py)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from keybrake.adopt.yaml_bound import AliasExpansion, BoundedComposer, TooManyAliasNodes

__all__ = [
    "KINDS",
    "Document",
    "FanOut",
    "Skipped",
    "Unreadable",
    "Workflow",
    "line_of",
    "load_documents",
    "load_paths",
    "yaml_round_trip",
]

# Kinds that hold templates, and where their workflow spec is.
KINDS = {
    "Workflow": ("spec",),
    "WorkflowTemplate": ("spec",),
    "ClusterWorkflowTemplate": ("spec",),
    "CronWorkflow": ("spec", "workflowSpec"),
}
SUFFIXES = (".yaml", ".yml")
FAN_OUT = ("withItems", "withParam", "withSequence")


def yaml_round_trip() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long line the author wrote on one
    yaml.Composer = BoundedComposer
    return yaml


def load_documents(text: str, yaml: YAML | None = None) -> list[Any]:
    """Every document of a file's text, as `yaml` (a `yaml_round_trip()`) loads them: where
    lint and wrap read a file. Raises `TooManyAliasNodes` when its aliases stand for more than
    `ALIAS_NODE_LIMIT` nodes, before anything is built from them; `YAMLError` when it is no
    YAML; `RecursionError` when nested too deep."""
    yaml = yaml or yaml_round_trip()
    composer = yaml.composer
    if not isinstance(composer, BoundedComposer):
        raise TypeError("load_documents needs a YAML from yaml_round_trip()")
    composer.expansion = AliasExpansion()  # counted per file
    return list(yaml.load_all(io.StringIO(text)))


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file read but not linted: Helm-templated, say, which is YAML only once rendered."""

    path: Path
    reason: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A path that could not be read at all (exit 2)."""

    path: Path
    reason: str


@dataclass(slots=True)
class Document:
    """One YAML document of a file, as loaded (a CommentedMap)."""

    path: Path
    index: int  # its place among the file's documents
    body: CommentedMap


def line_of(node: Any, key: str | None = None) -> int:
    """The 1-based line of a mapping (or of one of its keys); 0 when unknown."""
    lc = getattr(node, "lc", None)
    if lc is None:
        return 0
    if key is not None and isinstance(node, CommentedMap) and key in node:
        try:
            return int(lc.key(key)[0]) + 1
        except (KeyError, TypeError):
            pass
    return int(lc.line) + 1


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and child.suffix in SUFFIXES:
                yield child
    else:
        yield path


def _looks_like_helm(text: str) -> bool:
    """Go template actions outside Argo's own `{{inputs...}}`-style references: `{{ .Values`,
    `{{- if`, `{{ include`, `{{ end }}`."""
    return any(
        marker in text
        for marker in (
            "{{ .",
            "{{- ",
            "{{.",
            "{{ include",
            "{{ end",
            "{{ if",
            "{{ range",
            "{{ template",
        )
    )


def load_paths(paths: list[Path]) -> tuple[list[Document], list[Skipped], list[Unreadable]]:
    documents: list[Document] = []
    skipped: list[Skipped] = []
    unreadable: list[Unreadable] = []
    yaml = yaml_round_trip()
    for root in paths:
        if not root.exists():
            unreadable.append(Unreadable(root, "no such file or directory"))
            continue
        for path in _files(root):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                unreadable.append(Unreadable(path, f"cannot read: {exc}"))
                continue
            try:
                loaded = load_documents(text, yaml)
            except RecursionError:
                unreadable.append(Unreadable(path, "nested too deep to read"))
                continue
            except TooManyAliasNodes as exc:
                unreadable.append(Unreadable(path, str(exc)))
                continue
            except YAMLError as exc:
                # Go template actions outside quoted strings are what make a chart's template
                # no YAML; in a YAML file that loads they are text (a script's go-template,
                # say), and it is linted.
                if _looks_like_helm(text):
                    skipped.append(
                        Skipped(path, "Helm-templated: lint the output of `helm template`")
                    )
                    continue
                mark = getattr(exc, "problem_mark", None)
                where = f" (line {mark.line + 1})" if mark is not None else ""
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                unreadable.append(Unreadable(path, f"not valid YAML{where}: {problem}"))
                continue
            for index, body in enumerate(loaded):
                if isinstance(body, CommentedMap):
                    documents.append(Document(path, index, body))
    return documents, skipped, unreadable


@dataclass(slots=True)
class Workflow:
    """A document of one of the four kinds, with its workflow spec and templates by name."""

    document: Document
    kind: str
    name: str
    spec: CommentedMap
    templates: dict[str, CommentedMap] = field(default_factory=dict)
    _fan_outs: dict[str, list[FanOut]] | None = None

    @classmethod
    def of(cls, document: Document) -> Workflow | None:
        body = document.body
        kind = body.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            return None
        if not str(body.get("apiVersion", "")).startswith("argoproj.io/"):
            return None
        spec: Any = body
        for key in KINDS[kind]:
            spec = spec.get(key) if isinstance(spec, CommentedMap) else None
        if not isinstance(spec, CommentedMap):
            return None
        metadata = body.get("metadata")
        name = "?"
        if isinstance(metadata, CommentedMap):
            name = str(metadata.get("name") or metadata.get("generateName") or "?")
        templates: dict[str, CommentedMap] = {}
        listed = spec.get("templates")
        for template in listed if isinstance(listed, CommentedSeq) else []:
            if isinstance(template, CommentedMap) and isinstance(template.get("name"), str):
                templates[template["name"]] = template
        workflow = cls(document, kind, name, spec, templates)
        # A step's or task's `inline` template runs pods too: it is known as `holder/step`.
        for holder, template in list(templates.items()):
            for call in workflow.calls(template):
                if isinstance(call.get("inline"), CommentedMap):
                    templates[f"{holder}/{call.get('name')}"] = call["inline"]
        return workflow

    @staticmethod
    def target(holder: str, call: CommentedMap) -> str | None:
        """The template a step or task runs, in this workflow (None: by templateRef)."""
        if isinstance(call.get("template"), str):
            return str(call["template"])
        if isinstance(call.get("inline"), CommentedMap):
            return f"{holder}/{call.get('name')}"
        return None

    @property
    def title(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def annotations(self) -> dict[str, str]:
        metadata = self.document.body.get("metadata")
        found = metadata.get("annotations") if isinstance(metadata, CommentedMap) else None
        if not isinstance(found, dict):
            return {}
        return {str(k): str(v) for k, v in found.items()}

    @staticmethod
    def calls(template: CommentedMap) -> Iterator[CommentedMap]:
        """The steps or DAG tasks of a steps/dag template."""
        steps = template.get("steps")
        for group in steps if isinstance(steps, CommentedSeq) else []:
            if isinstance(group, CommentedSeq):
                yield from (s for s in group if isinstance(s, CommentedMap))
            elif isinstance(group, CommentedMap):
                yield group
        dag = template.get("dag")
        tasks = dag.get("tasks") if isinstance(dag, CommentedMap) else None
        if isinstance(tasks, CommentedSeq):
            yield from (t for t in tasks if isinstance(t, CommentedMap))

    def fan_outs(self) -> dict[str, FanOut]:
        """Templates that run as many pods at once: called with withItems/withParam/
        withSequence, or called (at any depth) from a template that is; each with the nearest
        call that fans it out (see `fans_reaching` for all of them)."""
        return {name: fans[0] for name, fans in self._fans().items()}

    def fans_reaching(self, name: str) -> list[FanOut]:
        """Every fanning call whose pods run `name` (nested fan-outs: one per level)."""
        return self._fans().get(name, [])

    def _fans(self) -> dict[str, list[FanOut]]:
        """Walks once from each fanning call, each template once per walk."""
        if self._fan_outs is not None:
            return self._fan_outs
        seeds: list[tuple[str, FanOut]] = []
        for holder, template in self.templates.items():
            for call in self.calls(template):
                target = self.target(holder, call)
                if target is not None and any(key in call for key in FAN_OUT):
                    seeds.append((target, FanOut(call, holder)))
        found: dict[str, list[FanOut]] = {}
        for start, fan in seeds:
            for name, _template in self.reachable(start):
                found.setdefault(name, []).append(fan)
        # Nearest first: the call that fans the template itself out before those further up.
        for name, fans in found.items():
            fans.sort(key=lambda f: f.call.get("template") != name)
        self._fan_outs = found
        return found

    def reachable(self, start: str) -> Iterator[tuple[str, CommentedMap]]:
        """`start` and every template it runs, at any depth, each once (recursion is safe)."""
        seen: set[str] = set()
        stack = [start]
        while stack:
            name = stack.pop()
            template = self.templates.get(name)
            if template is None or name in seen:
                continue
            seen.add(name)
            yield name, template
            for call in self.calls(template):
                target = self.target(name, call)
                if target is not None and target not in seen:
                    stack.append(target)

    def bounded(self, holder: str) -> bool:
        """Whether a fan-out by a step of `holder` runs a bounded number of pods at once:
        `parallelism` on `holder` (it bounds that template's children) or on the workflow. A
        template's own parallelism bounds what it runs, never how many copies of it run."""
        template = self.templates.get(holder)
        return any(
            isinstance(source, dict) and source.get("parallelism") is not None
            for source in (template, self.spec)
        )

    @staticmethod
    def refs_of(template: CommentedMap) -> Iterator[tuple[CommentedMap, tuple[str, str]]]:
        """(node, (WorkflowTemplate, template)) of each template another file holds that
        `template` runs: its own `templateRef` (node: the template; Argo 2's form, the template
        runs the one referenced), and its steps' or tasks' (node: the step or task)."""
        for node in (template, *Workflow.calls(template)):
            ref = node.get("templateRef")
            if isinstance(ref, CommentedMap):
                yield node, (str(ref.get("name", "")), str(ref.get("template", "")))

    def refs(self) -> Iterator[tuple[str, CommentedMap, tuple[str, str]]]:
        """(holder, node, (WorkflowTemplate, template)) of every templateRef of the workflow,
        `holder` being the template that holds it (see `refs_of`)."""
        for holder, template in self.templates.items():
            for node, ref in self.refs_of(template):
                yield holder, node, ref

    def template_refs(self) -> Iterator[tuple[CommentedMap, CommentedMap]]:
        """(call, its templateRef) of every step or task calling a template in another file."""
        for template in self.templates.values():
            for step in self.calls(template):
                ref = step.get("templateRef")
                if isinstance(ref, CommentedMap):
                    yield step, ref


@dataclass(frozen=True, slots=True)
class FanOut:
    call: CommentedMap  # the step or task with withItems/withParam/withSequence
    holder: str  # the steps or dag template holding it
