"""Real processes for tests: `keybrake serve` on a loopback socket, and localstripe."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.server import bound_socket, free_port

ADMIN_KEY = "kba_test_admin_token_0123456789"
STRIPE_SECRET = "sk_test_REALSECRET_do_not_leak_4242"
BIN = Path(sys.executable).parent


def wait_until_ready(
    url: str,
    process: subprocess.Popen[bytes],
    what: str,
    timeout: float = 30,
    verify: str | bool = True,
) -> None:
    """Poll a readiness URL until it answers 200 (bounded); fail with the process output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before becoming ready")
        try:
            if httpx.get(url, timeout=1.0, verify=verify).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # polling a readiness probe, not synchronising on elapsed time
    raise RuntimeError(f"{what} did not become ready within {timeout}s")


@dataclass
class Localstripe:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_localstripe() -> Localstripe:
    port = free_port()
    exe = shutil.which("localstripe", path=str(BIN)) or "localstripe"
    process = subprocess.Popen(
        [exe, "--port", str(port), "--from-scratch"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    ls = Localstripe(url, process)
    try:
        wait_until_ready(f"{url}/v1/customers", process, "localstripe")
    except Exception:
        ls.stop()
        raise
    return ls


def issue_key(admin: httpx.Client, **spec: Any) -> dict[str, Any]:
    """A vault key from the admin API: a $300-a-day Stripe key for PaymentIntents unless told."""
    body = {
        "vendor": "stripe",
        "daily_usd_cap": 300,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "2h",
        "agent_run_label": "argo/test-run",
    }
    body.update(spec)
    with admin as client:
        response = client.post("/vault/keys", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


@dataclass
class ProxyProcess:
    url: str
    admin_key: str
    database_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    ca_file: Path | None = None  # the CA its TLS certificate is checked against (https only)

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=30,
            verify=str(self.ca_file) if self.ca_file else True,
        )

    def issue(self, **spec: Any) -> dict[str, Any]:
        return issue_key(self.admin(), **spec)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def start_proxy(
    tmp_path: Path,
    *,
    stripe_base: str | None = None,
    database_url: str | None = None,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
    loop: str = "asyncio",
    ca_file: Path | None = None,
) -> ProxyProcess:
    """`keybrake serve` on a free port; with `ca_file`, it serves TLS (the certificate and key
    in `extra_env`) and is reached over https, checked against that CA."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    database_url = database_url or f"sqlite:///{tmp_path / 'keybrake.db'}"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_") or k == "KEYBRAKE_URL"
    }
    env.update(
        {
            "KEYBRAKE_API_KEY": ADMIN_KEY,
            "KEYBRAKE_DATABASE_URL": database_url,
            "KEYBRAKE_STRIPE_SECRET_KEY": STRIPE_SECRET,
        }
    )
    if stripe_base:
        env["KEYBRAKE_STRIPE_API_BASE"] = stripe_base
    env.update(extra_env or {})
    log_path = tmp_path / f"proxy-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(BIN / "keybrake"),
                "serve",
                "--fd",
                str(sock.fileno()),
                "--workers",
                str(workers),
                "--log-level",
                "info",
                "--loop",
                loop,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(sock.fileno(),),
            cwd=tmp_path,
        )
    sock.close()
    url = f"{'https' if ca_file else 'http'}://127.0.0.1:{port}"
    proxy = ProxyProcess(url, ADMIN_KEY, database_url, process, log_path, env, ca_file)
    try:
        verify = str(ca_file) if ca_file else True
        wait_until_ready(f"{url}/readyz", process, "keybrake serve", verify=verify)
    except Exception:
        proxy.stop()
        raise RuntimeError(proxy.log())
    return proxy
