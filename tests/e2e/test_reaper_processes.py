"""`keybrake reaper` as it runs in production: a process of its own, watching the fake Workflow
API through a kubeconfig and revoking through the proxy with a revoke-only issuer token, until
SIGTERM ends it cleanly. The process and its signal handling are the point, so this is an
end-to-end test; the reaper's behaviour is tests/test_reaper.py (in a thread)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.workflow_api import FakeWorkflowAPI
from tests.proxyproc import BIN
from tests.reaper_harness import NAMESPACE, eventually, reaper_token, run_key, status
from tests.served import ServedProxy


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeWorkflowAPI]:
    fake = FakeWorkflowAPI(tmp_path)
    yield fake
    fake.stop()


def test_the_command_runs_until_stopped(
    api: FakeWorkflowAPI, proxy_server: ServedProxy, tmp_path: Path
) -> None:
    uid = api.add("billing-agent-cli", NAMESPACE)
    key = run_key(proxy_server, uid, "billing-agent-cli")
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")},
        "KEYBRAKE_URL": proxy_server.url,
        "KEYBRAKE_API_KEY": reaper_token(proxy_server),
        "KUBECONFIG": str(kubeconfig),
    }
    log = tmp_path / "reaper.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "keybrake"), "reaper", "--cluster", "test", "--resync", "1h"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        eventually(lambda: len(api.watches()) >= 1, "the command to watch")
        api.update(uid, shutdown="Terminate", phase="Failed")
        eventually(lambda: status(proxy_server, key) == "revoked", "the key to be revoked")
        # The reaper says why once its revoke is answered: wait for the line, not a time.
        eventually(lambda: "was terminated" in log.read_text(), "the reaper to say why")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
    text = log.read_text()
    assert code == 0, text
    assert "was terminated" in text and "Traceback" not in text
