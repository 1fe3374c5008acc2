"""The release: the version as each place states it, and the build `make dist` makes.

The version lives in pyproject.toml only; everything else states it and is held to it by
tests/test_release.py. `make dist` (`python -m tests.release dist`) and tests/e2e/test_packaging.py
build through `build_dist`, so the wheel the test installs is built the way a release's is, and
one rule (`warnings_in`) says what counts as a warning.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/keybrake/keybrake"
# A released section: `## 0.2.0 — 2026-12-06`. Only an `## Unreleased` section may stand above
# the newest one (changes merged since), so the newest release is the first such heading.
RELEASE_HEADING = re.compile(r"^## (?P<version>\d+\.\d+\.\d+) — (?P<date>\d{4}-\d{2}-\d{2})$")
# Files that tell a reader which image to run; every tag in them is the release's.
IMAGE_TAG_FILES = ("README.md", "Dockerfile", "docs/*.md", "templates/**/*.yaml")
IMAGE_REF = re.compile(re.escape(IMAGE) + r":(?P<tag>[\w.\-]+)")
# A kustomize `images:` override (comment lines are examples of other tags and are skipped).
NEW_TAG = re.compile(r"^\s*newTag:\s*(?P<tag>\S+)")


def pyproject_version(root: Path = ROOT) -> str:
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return str(project["version"])


@dataclass(frozen=True)
class Release:
    version: str
    date: date


def changelog_release(root: Path = ROOT) -> Release:
    """The newest released section of CHANGELOG.md; ValueError when there is none, or when
    anything but `## Unreleased` stands above it."""
    for number, line in enumerate(
        (root / "CHANGELOG.md").read_text(encoding="utf-8").splitlines(), 1
    ):
        if not line.startswith("## "):
            continue
        found = RELEASE_HEADING.match(line)
        if found:
            return Release(found["version"], date.fromisoformat(found["date"]))
        if line != "## Unreleased":
            raise ValueError(
                f"CHANGELOG.md:{number}: {line!r} is neither '## Unreleased' nor "
                "'## X.Y.Z — YYYY-MM-DD'"
            )
    raise ValueError("CHANGELOG.md has no '## X.Y.Z — YYYY-MM-DD' section")


@dataclass(frozen=True)
class ImageTag:
    path: str  # relative to the root
    line: int
    tag: str


def image_tags(root: Path = ROOT) -> list[ImageTag]:
    """Every tag of keybrake's image that the docs, the Dockerfile and the manifests state."""
    found: list[ImageTag] = []
    paths = sorted({path for pattern in IMAGE_TAG_FILES for path in root.glob(pattern)})
    for path in paths:
        relative = path.relative_to(root).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            tags = [match["tag"] for match in IMAGE_REF.finditer(line)]
            if path.suffix in (".yaml", ".md"):
                tag = NEW_TAG.match(line)
                if tag:
                    tags.append(tag["tag"])
            found.extend(ImageTag(relative, number, tag) for tag in tags)
    return found


# --- the build -----------------------------------------------------------------------------

# Paths in the build's log (`copying tests/test_settings_warnings.py -> ...`) are not warnings.
_PATH = re.compile(r"\S*/\S*")
_WARNING = re.compile(r"warn", re.IGNORECASE)


def warnings_in(output: str) -> list[str]:
    """The lines of a build's output that warn (setuptools' `SetuptoolsDeprecationWarning`,
    distutils' `warning: ...`), file names aside."""
    return [line for line in output.splitlines() if _WARNING.search(_PATH.sub("", line))]


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path
    output: str


class BuildFailed(Exception):
    pass


def build_dist(source: Path, outdir: Path) -> Built:
    """An sdist of `source`, then a wheel built from that sdist, into `outdir`.

    Offline: no build isolation, so the venv's own setuptools and wheel build it (the `test`
    extra installs them). The wheel comes from the unpacked sdist, so a file the sdist forgets
    breaks the build here rather than for whoever builds from it.
    """
    env = dict(os.environ)
    # A developer's PYTHONDONTWRITEBYTECODE makes distutils warn that it skips byte-compiling:
    # a note about this shell, not about the package (make unexports it too).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), str(source)],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise BuildFailed(output)
    version = pyproject_version(source)
    wheel = outdir / f"keybrake-{version}-py3-none-any.whl"
    sdist = outdir / f"keybrake-{version}.tar.gz"
    for path in (wheel, sdist):
        if not path.is_file():
            raise BuildFailed(f"{output}\nthe build made no {path.name}")
    return Built(wheel, sdist, output)


def _dist(outdir: Path) -> int:
    """`make dist`: exit 1 (and say why) when the build fails or warns."""
    if outdir.exists():  # a wheel of an older version left there would ship by mistake
        shutil.rmtree(outdir)
    try:
        built = build_dist(ROOT, outdir)
    except BuildFailed as exc:
        print(f"{exc}\nmake dist: the build failed", file=sys.stderr)
        return 1
    warned = warnings_in(built.output)
    if warned:  # nothing is left to ship: a warned build is a failed one
        shutil.rmtree(outdir)
        print("\n".join(["make dist: the build warned:", *warned]), file=sys.stderr)
        return 1
    for path in (built.wheel, built.sdist):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.release")
    commands = parser.add_subparsers(dest="command", required=True)
    dist = commands.add_parser("dist", help="build the wheel and the sdist; fail on any warning")
    dist.add_argument("--outdir", type=Path, default=ROOT / "dist")
    arguments = parser.parse_args()
    return _dist(arguments.outdir.resolve())


if __name__ == "__main__":
    sys.exit(main())
