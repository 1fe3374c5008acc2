"""What a user installs: the wheel `make dist` builds, installed on its own into a fresh venv,
runs the CLI, renders the templates and serves the dashboard with its assets; building warns of
nothing; and `make demo` installs the demo's needs only (not the test tools)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.fakes.server import bound_socket
from tests.proxyproc import wait_until_ready
from tests.release import ROOT, Built, build_dist, pyproject_version, warnings_in

ADMIN_TOKEN = "kba_wheel_test_admin_token_0123456789"
# What the product reads at run time besides its modules.
DATA_FILES = (
    "keybrake/proxy/store/ledger.sql",
    "keybrake/proxy/pricing.toml",
    "keybrake/proxy/ui/templates/run.html",
    "keybrake/proxy/ui/templates/login.html",
    "keybrake/proxy/ui/static/keybrake.css",
)
# The folders of templates/ that `keybrake templates render` writes (the rest is hand-written).
RENDERED = ("workflowtemplates", "clusterworkflowtemplates", "examples")
# What a fresh clone holds that the build reads: not the venv, not what earlier builds left.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".typecheck",
    ".hypothesis", "keybrake.db*", "*.sqlite3*", "_bench_raw",
)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The sdist and wheel of a copy of the checkout as a clone would have it: building in the
    checkout itself would race other workers over its build/ and egg-info folders."""
    root = tmp_path_factory.mktemp("release")
    shutil.copytree(ROOT, root / "source", ignore=NOT_IN_A_CLONE)
    return build_dist(root / "source", root / "dist")


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel, and nothing of the checkout: its `bin/` folder.

    No network: the wheel goes in with --no-deps --no-index, and the dependencies come from the
    project's venv, whose site-packages a `.pth` line appends to the fresh venv's sys.path. A
    path line only adds the folder: the `.pth` files inside it are not run, so the editable
    install's finder (the checkout) is never loaded, and the fresh site-packages comes first.
    """
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, with_pip=False)
    python = home / "bin" / "python"
    fresh = _ask(python, "import sysconfig; print(sysconfig.get_path('purelib'))", home)
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(fresh, "keybrake-test-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", "--disable-pip-version-check", str(built.wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return home / "bin"


def _ask(python: Path, code: str, cwd: Path) -> str:
    """What `python -c code` prints, run from `cwd`: never from the checkout, whose
    keybrake.egg-info `-c`'s sys.path[0] (the working directory) would find."""
    return subprocess.run(
        [str(python), "-c", code], cwd=cwd, env=_env(), check=True, capture_output=True, text=True
    ).stdout.strip()


def _env() -> dict[str, str]:
    """The caller's environment without anything that points Python or keybrake elsewhere."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEYBRAKE_", "PYTHON")) and k != "VIRTUAL_ENV"
    }


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "keybrake"), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_build_warns_of_nothing_and_carries_the_data(built: Built) -> None:
    assert not warnings_in(built.output), "\n".join(warnings_in(built.output))
    assert built.wheel.name == f"keybrake-{pyproject_version()}-py3-none-any.whl"
    names = set(zipfile.ZipFile(built.wheel).namelist())
    assert not [needed for needed in DATA_FILES if needed not in names]
    with tarfile.open(built.sdist) as sdist:
        top = f"keybrake-{pyproject_version()}/"
        members = {m.name.removeprefix(top) for m in sdist.getmembers()}
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "proxy/store/ledger.sql"} <= members
    assert not [name for name in members if name.startswith("tests/")]
    # The licence text travels with both, and the wheel's metadata names it (PEP 639).
    assert "LICENSE" in members
    info = f"keybrake-{pyproject_version()}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(built.wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()


def test_a_warning_is_told_from_a_file_name() -> None:
    output = (
        "copying tests/test_settings_warnings.py -> keybrake-0.2.0/tests\n"
        "adding 'keybrake/cli/warnings.py'\n"
        "/usr/lib/setuptools/command/build_py.py:212: _Warning: Package 'x' is absent\n"
        "warning: build_py: byte-compiling is disabled, skipping.\n"
        "SetuptoolsDeprecationWarning: License classifiers are deprecated.\n"
    )
    assert warnings_in(output) == output.splitlines()[2:]


def test_data_left_out_of_the_packages_warns(tmp_path: Path) -> None:
    """The warning the package data once gave (a data folder missing from `packages`, its files
    still named for the sdist) is one that `make dist` and the test above fail on."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_IN_A_CLONE)
    pyproject = source / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    listed = '  "keybrake.proxy.ui.static",\n'
    assert listed in text
    pyproject.write_text(text.replace(listed, ""), encoding="utf-8")
    with open(source / "MANIFEST.in", "a", encoding="utf-8") as manifest:
        manifest.write("graft proxy/ui/static\n")
    assert warnings_in(build_dist(source, tmp_path / "dist").output)


def test_the_installed_wheel_runs_on_its_own(installed: Path, tmp_path: Path, built: Built) -> None:
    site = _ask(
        installed / "python", "import sysconfig; print(sysconfig.get_path('purelib'))", tmp_path
    )
    where = _ask(
        installed / "python",
        "import importlib.metadata as m, keybrake.cli, keybrake.proxy.ui\n"
        "print(keybrake.cli.__file__); print(keybrake.proxy.ui.__file__)\n"
        "print(m.distribution('keybrake').locate_file('')); print(m.version('keybrake'))",
        tmp_path,
    ).splitlines()
    assert [Path(p).is_relative_to(site) for p in where[:3]] == [True] * 3, where
    assert where[3] == pyproject_version()

    helped = _run(installed, tmp_path, "--help")
    assert helped.returncode == 0 and "Dollar-capped" in helped.stdout, helped.stderr
    told = _run(installed, tmp_path, "version")
    assert told.returncode == 0 and told.stdout.splitlines()[0] == pyproject_version()

    # The templates are rendered from the installed package, and are what the checkout holds.
    rendered = _run(installed, tmp_path, "templates", "render", "--out", str(tmp_path / "out"))
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    made = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.yaml"))
    shipped = sorted(
        p.relative_to(ROOT / "templates")
        for folder in RENDERED
        for p in (ROOT / "templates" / folder).rglob("*.yaml")
    )
    assert made == shipped and made
    changed = [
        p
        for p in made
        if (tmp_path / "out" / p).read_bytes() != (ROOT / "templates" / p).read_bytes()
    ]
    assert not changed

    with _serving(installed, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as ui:
        form = ui.get("/ui/login")
        assert form.status_code == 200 and 'href="/ui/static/keybrake.css"' in form.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf, form.text
        ui.post("/ui/login", data={"csrf": csrf[1], "token": ADMIN_TOKEN, "next": "/ui/"})
        runs = ui.get("/ui/")
        assert runs.status_code == 200 and "<h1>Runs</h1>" in runs.text, runs.text
        css = ui.get("/ui/static/keybrake.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert css.content == (ROOT / "proxy" / "ui" / "static" / "keybrake.css").read_bytes()


@contextmanager
def _serving(bin_dir: Path, tmp_path: Path) -> Iterator[str]:
    """`keybrake serve` of the installed wheel on a socket bound here (no port race), on its
    embedded SQLite; stopped with SIGTERM when the block ends."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    env = _env() | {
        "KEYBRAKE_API_KEY": ADMIN_TOKEN,
        "KEYBRAKE_DATABASE_URL": f"sqlite:///{tmp_path / 'keybrake.db'}",
        "KEYBRAKE_STRIPE_SECRET_KEY": "sk_test_wheel_placeholder",
    }
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(bin_dir / "keybrake"), "serve", "--fd", str(sock.fileno())],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(sock.fileno(),),
        )
    sock.close()
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(f"{url}/readyz", process, "keybrake serve (the wheel's)")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{log_path.read_text(errors='replace')}") from None
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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
