"""The CLI's output where a process of its own is the point: the terminal's width is read when
output is written, not when the CLI was imported (once a process). In-process output tests:
tests/test_cli_output.py."""

from __future__ import annotations

import subprocess
import sys

from tests.proxyproc import ADMIN_KEY
from tests.served import ServedProxy
from tests.test_cli_output import Terminal

# COLUMNS as a shell had it when the CLI started, then as a user (or a test) sets it for the
# command: the second is the width it must print to.
PROBE = """
import os, sys
os.environ["COLUMNS"] = "80"
from keybrake.cli.main import main
os.environ["COLUMNS"] = "200"
sys.argv = ["keybrake", "events"]
main()
"""


def test_the_width_is_read_when_output_is_written_not_at_import(bare_proxy: ServedProxy) -> None:
    """The events table (wider than 80 columns, narrower than 200) printed at a terminal that is
    200 wide by the time it prints: a row a line, none folded to the 80 of import time."""
    proxy = bare_proxy
    for n in range(3):
        proxy.issue(agent_run_label=f"argo/width-{n}")
    env = {**proxy.env, "KEYBRAKE_API_KEY": ADMIN_KEY}
    env.pop("COLUMNS", None)
    with Terminal() as tty:
        done = subprocess.run(
            [sys.executable, "-c", PROBE],
            stdout=tty.file.fileno(),
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    lines = [line.rstrip() for line in tty.text.splitlines()]
    with proxy.admin() as admin:
        events = admin.get("/vault/events").json()["data"]
    assert len(lines) == 1 + len(events), tty.text
    assert 80 < max(len(line) for line in lines) <= 200
    for line, event in zip(lines[1:], events, strict=True):
        assert line.startswith(event["ts"][:19].replace("T", " ")) and event["target"] in line
