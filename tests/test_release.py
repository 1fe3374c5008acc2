"""One version: pyproject.toml's is the installed package's, `keybrake version`'s, the CHANGELOG's
newest release and the tag of every image the docs and the manifests name (tests/release.py)."""

from __future__ import annotations

import shutil
import tomllib
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keybrake.cli.main import app
from tests.release import ROOT, changelog_release, image_tags, pyproject_version

# The files a reader takes the image from: each must name it at least once, so a renamed
# registry cannot leave this test checking nothing.
MUST_NAME_THE_IMAGE = {
    "templates/proxy/deployment.yaml",
    "templates/proxy/reaper.yaml",
    "templates/proxy/kustomization.yaml",
    "docs/deploy.md",
    "README.md",
    "Dockerfile",
}


def version_disagreements(root: Path) -> list[str]:
    """What disagrees with pyproject.toml's version under `root`, one line each."""
    version = pyproject_version(root)
    found = []
    try:
        release = changelog_release(root)
    except ValueError as exc:
        found.append(str(exc))
    else:
        if release.version != version:
            found.append(f"CHANGELOG.md's newest release is {release.version}")
    tags = image_tags(root)
    found += [f"{t.path}:{t.line}: image tag {t.tag}" for t in tags if t.tag != version]
    silent = MUST_NAME_THE_IMAGE - {t.path for t in tags}
    found += [f"{path}: names no image tag" for path in sorted(silent)]
    return [f"{line} (pyproject.toml: {version})" for line in found]


def test_every_place_states_the_version_of_pyproject() -> None:
    assert not version_disagreements(ROOT), "\n".join(version_disagreements(ROOT))


def test_the_installed_package_and_keybrake_version_say_it_too() -> None:
    # The editable install's metadata is pyproject's as of `make install` (which pyproject.toml
    # triggers): a stale venv fails here rather than printing an old version.
    assert installed_version("keybrake") == pyproject_version()
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == pyproject_version()


def test_the_licence_text_is_the_licence_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert declared["license"] == "Apache-2.0" and declared["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text().split()
    assert text[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in " ".join(text)


def test_the_newest_release_is_dated() -> None:
    release = changelog_release()
    assert release.date.year >= 2026


@pytest.mark.parametrize(
    ("path", "old", "new", "says"),
    [
        ("pyproject.toml", 'version = "{v}"', 'version = "9.9.9"', "newest release is {v}"),
        ("CHANGELOG.md", "## {v} — ", "## 9.9.9 — ", "newest release is 9.9.9"),
        ("CHANGELOG.md", "## {v} — ", "## Next\n\n## {v} — ", "'## Next' is neither"),
        ("templates/proxy/kustomization.yaml", "newTag: {v}", "newTag: 9.9.9", "tag 9.9.9"),
        ("templates/proxy/reaper.yaml", "keybrake:{v}", "keybrake:9.9.9", "reaper.yaml:"),
        ("docs/deploy.md", "keybrake:{v}", "keybrake:9.9.9", "deploy.md:"),
        ("Dockerfile", "keybrake:{v}", "keybrake:latest", "tag latest"),
        ("templates/proxy/deployment.yaml", "keybrake:{v}", "other/image:{v}", "names no image"),
    ],
)
def test_a_disagreement_is_found(tmp_path: Path, path: str, old: str, new: str, says: str) -> None:
    """The check run on an edited copy of the files it reads: each edit is caught."""
    version = pyproject_version()
    for name in ("pyproject.toml", "CHANGELOG.md", "README.md", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("docs", "templates"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    assert not version_disagreements(tmp_path)
    edited = tmp_path / path
    text = edited.read_text(encoding="utf-8")
    old, new = old.format(v=version), new.format(v=version)
    assert old in text
    edited.write_text(text.replace(old, new), encoding="utf-8")
    found = version_disagreements(tmp_path)
    assert any(says.format(v=version) in line for line in found), found
