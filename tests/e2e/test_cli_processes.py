"""The keybrake CLI where a process of its own is the point: the demo end to end and its Ctrl-C,
`keybrake serve` binding, printing where and generating a token, `audit --follow` ended by
SIGINT, and what a fresh interpreter imports for a plain command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from keybrake.cli.main import app
from tests.proxyproc import ADMIN_KEY
from tests.served import ServedProxy

runner = CliRunner()


def test_commands_that_do_not_render_templates_do_not_import_hera(
    proxy_server: ServedProxy,
) -> None:
    """`keybrake keys list` loads neither Hera nor the server (half a second and more)."""
    probe = (
        "import sys\n"
        "from keybrake.cli.main import main\n"
        "sys.argv = ['keybrake', 'keys', 'list', '-o', 'json']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "heavy = [m for m in ('hera', 'uvicorn', 'starlette', 'aiohttp', 'lightkube') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "KEYBRAKE_URL": proxy_server.url, "KEYBRAKE_API_KEY": ADMIN_KEY}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


@pytest.mark.slow
def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "keybrake.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "300 succeeded, 200 hit the cap" in out
    assert "localstripe holds 300 PaymentIntents" in out
    assert "revoked 1 key(s)" in out
    assert "refused (HTTP 401" in out
    assert "demo finished" in out


def test_serve_binds_first_and_says_where(tmp_path) -> None:
    """The address printed is the bound one (a real port for --port 0); a busy port is one line."""
    import httpx

    from tests.proxyproc import BIN, wait_until_ready

    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
    env |= {"KEYBRAKE_API_KEY": "x", "KEYBRAKE_DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"}
    proc = subprocess.Popen(
        [str(BIN / "keybrake"), "serve", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("keybrake proxy listening on http://127.0.0.1:"), line
        url = line.split()[4]
        port = int(url.rsplit(":", 1)[1])
        assert port != 0
        wait_until_ready(url + "/healthz", proc, "keybrake serve")
        assert httpx.get(url + "/healthz").status_code == 200
        busy = runner.invoke(app, ["serve", "--port", str(port)], env=env)
        assert busy.exit_code == 2
        assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in busy.stderr
        assert "listening" not in busy.stdout and "Traceback" not in busy.output
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.slow
def test_demo_cleans_up_on_ctrl_c() -> None:
    import contextlib
    import re
    import signal

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "keybrake.cli", "demo", "--calls", "2000", "--cap", "1500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None
    urls = []
    for line in proc.stdout:
        urls += re.findall(r"http://127\.0\.0\.1:\d+", line)
        if line.startswith("4."):  # the fan-out is starting
            break
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the demo dumps every thread's stack
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)  # gives the dump time to be written
        proc.kill()
        stacks, _ = proc.communicate()
        pytest.fail(f"the demo did not stop within 120 s of Ctrl-C:\n{stacks}")
    assert proc.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert len(urls) == 2
    for url in urls:  # localstripe and the proxy are gone
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)


def test_serve_generates_an_admin_token_and_defaults_to_sqlite_in_the_working_directory(
    tmp_path,
) -> None:
    import httpx

    from tests.fakes.server import bound_socket
    from tests.proxyproc import BIN, wait_until_ready

    sock = bound_socket()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
    proc = subprocess.Popen(
        [str(BIN / "keybrake"), "serve", "--generate-api-key", "--fd", str(sock.fileno())],
        env=env,
        cwd=tmp_path,
        pass_fds=(sock.fileno(),),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    try:
        assert proc.stderr is not None
        token = proc.stderr.readline().removeprefix("generated admin token: ").strip()
        assert token.startswith("kba_")
        wait_until_ready(url + "/readyz", proc, "keybrake serve")
        listed = httpx.get(url + "/vault/keys", headers={"Authorization": f"Bearer {token}"})
        assert listed.status_code == 200 and listed.json() == {"data": [], "continue": None}
        assert (tmp_path / "keybrake.db").exists()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_audit_follow_prints_new_rows_as_they_come(proxy_server: ServedProxy) -> None:
    import signal

    import stripe

    key = proxy_server.issue(agent_run_label="argo/followed")
    client = stripe.StripeClient(
        key["vault_key"] + ".pod-1", base_addresses={"api": proxy_server.url + "/stripe"}
    )
    client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    env = {**proxy_server.env, "KEYBRAKE_URL": proxy_server.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keybrake.cli", "audit", "-w", "followed", "-f", "-o", "json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["caller_tag"] == "pod-1"  # what was there
        client.v1.payment_intents.create(
            params={"amount": 200, "currency": "usd", "metadata": {"second": "yes"}}
        )
        later = json.loads(proc.stdout.readline())  # printed as it came
        assert later["caller_tag"] == "pod-1" and later["method"] == "POST"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err
