"""templates/ is exactly what the Python renders (the golden test), rendering is deterministic,
and `keybrake templates render [--check] [--out DIR]` behaves: stale files listed with a hint and
exit 1, hand-written files untouched, bad folders refused without a traceback. The command runs
in-process (CliRunner); that rendering is the same in a fresh interpreter, whatever its hash
seed, is tests/e2e/hera/test_hera_render_processes.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import Result
from hera.workflows import Workflow
from hera_fixtures import REPO
from typer.testing import CliRunner

import keybrake.hera_workflows.render as render_module
from keybrake.cli.main import app
from keybrake.hera_workflows.render import GENERATED_HEADER, RenderedFile, dump_yaml

TEMPLATES = REPO / "templates"


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command runs from the repository root, where its default --out (templates/) is."""
    monkeypatch.chdir(REPO)


@pytest.fixture(autouse=True)
def _rendered_once(monkeypatch: pytest.MonkeyPatch, rendered: list[RenderedFile]) -> None:
    """The command renders what the session rendered (the fixture `rendered`: the same
    `rendered_files()`, its YAML dumped once) instead of rendering again at each call."""
    monkeypatch.setattr(render_module, "rendered_files", lambda: list(rendered))


def keybrake(*args: str) -> Result:
    """`keybrake templates ARGS`, in-process. An exception the command did not turn into an exit
    code (a traceback, run as a process) fails here."""
    result = CliRunner().invoke(app, ["templates", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_committed_templates_equal_the_rendered_python(rendered: list[RenderedFile]) -> None:
    """The golden test. On failure: run `keybrake templates render` and commit the diff."""
    for rendered_file in rendered:
        committed = (TEMPLATES / rendered_file.path).read_text(encoding="utf-8")
        parsed = yaml.load(committed, Loader=yaml.CSafeLoader)  # libyaml: 50x PyYAML's speed
        assert parsed == rendered_file.document, rendered_file.path
        assert committed == rendered_file.text, rendered_file.path


def test_every_rendered_file_carries_the_generated_header(rendered: list[RenderedFile]) -> None:
    for rendered_file in rendered:
        assert rendered_file.text.splitlines()[0] == GENERATED_HEADER
    assert GENERATED_HEADER == "# generated — run `keybrake templates render`"


def test_the_expected_files_are_rendered(rendered: list[RenderedFile]) -> None:
    kinds = {(f.path, f.document["kind"], f.document["metadata"].get("name")) for f in rendered}
    assert kinds == {
        ("workflowtemplates/keybrake-vault-key.yaml", "WorkflowTemplate", "keybrake-vault-key"),
        ("workflowtemplates/keybrake-fanout.yaml", "WorkflowTemplate", "keybrake-fanout"),
        (
            "clusterworkflowtemplates/keybrake-vault-key.yaml",
            "ClusterWorkflowTemplate",
            "keybrake-vault-key",
        ),
        (
            "clusterworkflowtemplates/keybrake-fanout.yaml",
            "ClusterWorkflowTemplate",
            "keybrake-fanout",
        ),
        ("examples/billing-agent.yaml", "Workflow", None),
        ("examples/order-agent.yaml", "Workflow", None),
    }


def test_cluster_and_namespaced_variants_differ_only_in_kind(
    rendered: list[RenderedFile],
) -> None:
    by_path = {f.path: f.document for f in rendered}
    for name in ("keybrake-vault-key", "keybrake-fanout"):
        namespaced = by_path[f"workflowtemplates/{name}.yaml"]
        cluster = by_path[f"clusterworkflowtemplates/{name}.yaml"]
        assert {**cluster, "kind": "WorkflowTemplate"} == namespaced


def test_keys_follow_the_fixed_order() -> None:
    text = dump_yaml({"spec": {"templates": []}, "kind": "K", "apiVersion": "v", "zeta": 1})
    assert [line.split(":")[0] for line in text.splitlines()] == [
        "apiVersion",
        "kind",
        "spec",
        "  templates",
        "zeta",
    ]
    assert "|\n" in dump_yaml({"source": "line one\nline two\n"})


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def rendered_copy(tmp_path: Path) -> Path:
    """templates/ as committed, including the hand-written files beside the rendered ones."""
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES, target)
    return target


def test_check_passes_on_the_repository() -> None:
    result = keybrake("render", "--check")
    assert result.exit_code == 0, result.stderr
    assert "up to date" in result.stdout


def test_check_lists_stale_files_with_a_hint(rendered_copy: Path) -> None:
    changed = rendered_copy / "workflowtemplates/keybrake-fanout.yaml"
    changed.write_text(changed.read_text().replace("parallelism: 10", "parallelism: 11"))
    (rendered_copy / "examples/billing-agent.yaml").unlink()
    orphan = rendered_copy / "examples/old.yaml"
    orphan.write_text(f"{GENERATED_HEADER}\nkind: Workflow\n")
    before = {p: p.read_bytes() for p in rendered_copy.rglob("*") if p.is_file()}

    result = keybrake("render", "--check", "--out", str(rendered_copy))

    assert result.exit_code == 1
    assert "changed" in result.stderr and "keybrake-fanout.yaml" in result.stderr
    assert "missing" in result.stderr and "billing-agent.yaml" in result.stderr
    assert "orphaned" in result.stderr and "old.yaml" in result.stderr
    assert "Run `keybrake templates render`" in result.stderr
    assert "Traceback" not in result.stderr
    after = {p: p.read_bytes() for p in rendered_copy.rglob("*") if p.is_file()}
    assert after == before  # --check writes nothing


def test_render_repairs_and_leaves_hand_written_files_alone(rendered_copy: Path) -> None:
    (rendered_copy / "examples/billing-agent.yaml").write_text("edited by hand\n")
    orphan = rendered_copy / "examples/old.yaml"
    orphan.write_text(f"{GENERATED_HEADER}\nkind: Workflow\n")
    mine = rendered_copy / "examples/mine.yaml"
    mine.write_text("# my own workflow\nkind: Workflow\n")
    proxy_files = {p: p.read_bytes() for p in (rendered_copy / "proxy").rglob("*")}

    result = keybrake("render", "--out", str(rendered_copy))

    assert result.exit_code == 0, result.stderr
    assert "1 written, 1 removed, 5 unchanged" in result.stdout
    assert not orphan.exists()
    assert mine.read_text() == "# my own workflow\nkind: Workflow\n"
    assert {p: p.read_bytes() for p in (rendered_copy / "proxy").rglob("*")} == proxy_files
    assert keybrake("render", "--check", "--out", str(rendered_copy)).exit_code == 0


def test_render_into_an_empty_folder(tmp_path: Path) -> None:
    result = keybrake("render", "--out", str(tmp_path / "new"))
    assert result.exit_code == 0, result.stderr
    assert "6 written" in result.stdout
    assert keybrake("render", "--check", "--out", str(tmp_path / "new")).exit_code == 0


def test_bad_folders_are_refused_without_a_traceback(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args in (("render", "--out", str(a_file)), ("render", "--check", "--out", str(a_file))):
        result = keybrake(*args)
        assert result.exit_code == 2
        assert "is a file" in result.stderr
        assert "Traceback" not in result.stderr
    result = keybrake("render", "--check", "--out", str(tmp_path / "absent"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_an_unwritable_folder_is_refused_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = keybrake("render", "--out", str(tmp_path / "file" / "templates"))
    assert result.exit_code == 2
    assert "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_help_shows_an_example() -> None:
    result = keybrake("render", "--help")
    assert result.exit_code == 0
    assert "keybrake templates render --check" in result.stdout
    assert "--out" in result.stdout


def _python_blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "issue_vault_key(" in b]


@pytest.mark.parametrize("doc", ["docs/hera.md", "README.md"])
def test_documented_snippets_render_the_examples(doc: str, rendered: list[RenderedFile]) -> None:
    """The Python shown in the docs is an example that is rendered and golden-tested; docs/hera.md
    shows every example."""
    blocks = _python_blocks(REPO / doc)
    if doc == "README.md" and not blocks:
        pytest.skip("README.md shows no Hera snippet")
    assert blocks, f"{doc} shows no Hera snippet"
    examples = {f.path: f.document for f in rendered if f.path.startswith("examples/")}
    shown = set()
    for block in blocks:
        namespace: dict[str, object] = {}
        exec(compile(block, doc, "exec"), namespace)
        workflow = namespace["workflow"]
        assert isinstance(workflow, Workflow)
        matches = [path for path, document in examples.items() if document == workflow.to_dict()]
        assert matches, f"a snippet of {doc} is none of the rendered examples"
        shown.update(matches)
    if doc == "docs/hera.md":
        assert shown == set(examples)
