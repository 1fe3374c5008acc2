"""What a user installs: the wheel carries what the product reads at run time, building it warns
of nothing, and `make demo` installs the demo's needs only (not the test tools)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_builds_without_warnings_and_carries_its_data(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    # pip's own notes about this machine's package indexes are not the project's to fix.
    said = [line for line in (built.stdout + built.stderr).splitlines() if "Location" not in line]
    assert not [line for line in said if re.search(r"warn", line, re.I)], "\n".join(said)
    (wheel,) = tmp_path.glob("keybrake-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "keybrake/proxy/store/ledger.sql",
        "keybrake/proxy/pricing.toml",
        "keybrake/proxy/ui/templates/run.html",
        "keybrake/proxy/ui/static/keybrake.css",
    ):
        assert needed in names, needed


def test_make_demo_installs_the_demo_extra_only() -> None:
    """The demo target needs the package and its `demo` extra, not the test tools."""
    dry = subprocess.run(
        ["make", "-n", "-B", "demo", "VENV=/nonexistent/venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'.[demo]'" in dry and "'.[test]'" not in dry, dry
