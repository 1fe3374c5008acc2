"""Rendering templates/ from the Python: deterministic YAML, a generated header, stale checks.

`keybrake templates render` writes these files and `--check` compares them: the committed YAML
must equal what the building blocks produce today. Keys follow one fixed order (Kubernetes
first, then Argo's reading order, the script source last; anything else alphabetically), so a
change to the Python shows up as a small, readable diff. Only files carrying the generated header
belong to the renderer; hand-written files next to them (templates/proxy/) are never touched.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hera.workflows import ClusterWorkflowTemplate, Workflow, WorkflowTemplate

from . import published

__all__ = [
    "GENERATED_HEADER",
    "Comparison",
    "RenderedFile",
    "compare",
    "dump_yaml",
    "ordered",
    "rendered_files",
    "write",
]

GENERATED_HEADER = "# generated — run `keybrake templates render`"

_KEY_ORDER = (
    # Kubernetes objects and their metadata
    "apiVersion", "kind", "metadata", "spec", "name", "generateName", "namespace", "labels",
    "annotations",
    # workflow spec, then templates and DAG tasks in the order one reads them
    "entrypoint", "onExit", "template", "templateRef", "clusterScope", "depends", "when",
    "withItems", "withParam", "arguments", "inputs", "outputs", "parallelism", "retryStrategy",
    "activeDeadlineSeconds", "dag", "steps", "script", "container", "tasks", "templates",
    # parameters
    "value", "path", "default", "enum", "description", "globalName", "valueFrom",
    # retry strategy
    "limit", "retryPolicy", "expression", "backoff", "duration", "factor", "cap",
    # containers: the script source, usually long, last
    "image", "command", "args", "env", "resources", "requests", "limits", "securityContext",
    "source",
)  # fmt: skip
_RANK = {key: rank for rank, key in enumerate(_KEY_ORDER)}


def ordered(value: Any) -> Any:
    """`value` with every mapping's keys in the fixed order; lists keep their order."""
    if isinstance(value, Mapping):
        keys = sorted(value, key=lambda k: (_RANK.get(k, len(_RANK)), k))
        return {key: ordered(value[key]) for key in keys}
    if isinstance(value, list):
        return [ordered(item) for item in value]
    return value


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings (script sources) as literal blocks, never folded."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(document: Any) -> str:
    return yaml.dump(
        ordered(document),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=10_000,
    )


@dataclass(frozen=True)
class RenderedFile:
    """One file of templates/: where it goes, which Python it comes from, what it holds."""

    path: str
    origin: str
    document: dict[str, Any] = field(repr=False)

    @property
    def text(self) -> str:
        header = f"{GENERATED_HEADER}\n# from {self.origin}; edit the Python, not this file\n"
        return header + dump_yaml(self.document)


def _example(module: str) -> Workflow:
    loaded = importlib.import_module(f"{__package__}.examples.{module}")
    workflow = loaded.workflow
    assert isinstance(workflow, Workflow)
    return workflow


_PublishedBuilder = Callable[..., WorkflowTemplate]

EXAMPLES = ("billing_agent", "order_agent")
"""The example workflows (modules of `examples/`), rendered to templates/examples/."""


def rendered_files() -> list[RenderedFile]:
    """Every file the renderer owns, in a fixed order."""
    files: list[RenderedFile] = []
    builders: list[tuple[str, _PublishedBuilder]] = [
        ("keybrake-vault-key", published.vault_key),
        ("keybrake-fanout", published.fanout),
    ]
    for folder, kind in (
        ("workflowtemplates", WorkflowTemplate),
        ("clusterworkflowtemplates", ClusterWorkflowTemplate),
    ):
        for name, build in builders:
            origin = f"keybrake.hera_workflows.published.{build.__name__}({kind.__name__})"
            files.append(RenderedFile(f"{folder}/{name}.yaml", origin, build(kind).to_dict()))
    for module in EXAMPLES:
        origin = f"keybrake.hera_workflows.examples.{module}"
        path = f"examples/{module.replace('_', '-')}.yaml"
        files.append(RenderedFile(path, origin, _example(module).to_dict()))
    return files


@dataclass(frozen=True)
class Comparison:
    """How a templates/ folder differs from what the Python renders."""

    changed: list[str]
    missing: list[str]
    orphaned: list[str]
    up_to_date: list[str]

    @property
    def stale(self) -> list[str]:
        return sorted(self.changed + self.missing + self.orphaned)


def _generated_on_disk(out_dir: Path) -> set[str]:
    found: set[str] = set()
    if not out_dir.is_dir():
        return found
    for path in out_dir.rglob("*.y*ml"):
        try:
            with path.open(encoding="utf-8") as handle:
                first = handle.readline().rstrip("\n")
        except (OSError, UnicodeDecodeError):
            continue
        if first == GENERATED_HEADER:
            found.add(path.relative_to(out_dir).as_posix())
    return found


def compare(out_dir: Path, files: list[RenderedFile] | None = None) -> Comparison:
    files = rendered_files() if files is None else files
    changed: list[str] = []
    missing: list[str] = []
    up_to_date: list[str] = []
    for rendered in files:
        target = out_dir / rendered.path
        try:
            current = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            missing.append(rendered.path)
            continue
        (up_to_date if current == rendered.text else changed).append(rendered.path)
    owned = {rendered.path for rendered in files}
    orphaned = sorted(_generated_on_disk(out_dir) - owned)
    return Comparison(changed, missing, orphaned, up_to_date)


def write(out_dir: Path, files: list[RenderedFile] | None = None) -> Comparison:
    """Bring `out_dir` up to date: write changed and missing files, delete orphaned generated
    files. Returns what it found before writing. Raises OSError when the folder is unwritable."""
    files = rendered_files() if files is None else files
    found = compare(out_dir, files)
    for rendered in files:
        if rendered.path in found.changed or rendered.path in found.missing:
            target = out_dir / rendered.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(rendered.text, encoding="utf-8")
    for orphan in found.orphaned:
        (out_dir / orphan).unlink()
    return found
