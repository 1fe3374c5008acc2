"""The Resend contract where a process is the point: a workload that sets two environment
variables and nothing else (the resend SDK reads them when it is imported, so only a new Python
process shows what a pod does). The proxy it calls is served from a thread of the test process;
the rest of the Resend tests are in tests/test_resend.py, in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.fakes.resend_upstream import REAL_KEY, FakeResend
from tests.served import ServedProxy
from tests.vendor_helpers import audit, issue_resend

pytest_plugins = ["tests.vendor_fixtures"]


def test_environment_variables_alone_point_the_sdk_at_the_proxy(
    vendor_proxy: ServedProxy, fake_resend: FakeResend
) -> None:
    key = issue_resend(vendor_proxy)
    workload = (
        "import json, resend\n"
        "sent = resend.Emails.send({'from': 'a@example.com', 'to': ['b@example.com'],\n"
        "                           'subject': 'Hi', 'text': 'Hello'})\n"
        "print(json.dumps({'id': sent['id']}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESEND_")}
    env["RESEND_API_URL"] = vendor_proxy.url + "/resend"
    env["RESEND_API_KEY"] = key["vault_key"] + ".pod-7"
    done = subprocess.run(
        [sys.executable, "-c", workload], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    email_id = json.loads(done.stdout)["id"]
    assert email_id in fake_resend.emails
    sent = fake_resend.requests[-1]
    assert sent["headers"]["authorization"] == f"Bearer {REAL_KEY}"
    assert sent["credential"] == REAL_KEY and fake_resend.billed_to(REAL_KEY) == 1
    assert key["vault_key"] not in repr(sent)
    row = audit(vendor_proxy, key["key_id"])[0]
    assert (row["decision"], row["status"], row["caller_tag"]) == ("forwarded", 200, "pod-7")
    # One recipient, one email at the [resend] price: $0.0009.
    assert (row["reserved_usd"], row["settled_usd"]) == ("0.0009", "0.0009")
    assert (row["amount"], row["currency"]) == (1, "email")
    assert row["vendor_request_id"].endswith("-SJC")  # Cloudflare's cf-ray
