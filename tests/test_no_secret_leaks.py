"""Secrets never show where none belongs: a vault key pasted into a label, metadata, a path, a
caller tag or an idempotency key is refused and recorded redacted. The scan of everything a
`keybrake serve` process (SQLite, and PostgreSQL) answered, logged and stored, with every kind of
secret: tests/e2e/test_no_secret_leaks_processes.py."""

from __future__ import annotations

import json
from pathlib import Path

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_a_secret_where_none_belongs_is_refused_and_recorded_redacted(tmp_path: Path) -> None:
    from tests.inproc import Clock, StubUpstream, app_client, issue

    upstream = StubUpstream()
    with app_client(tmp_path, Clock(), upstream=upstream) as client:
        vault_key = issue(client)["vault_key"]
        pasted = "kbv_" + "x" * 43
        label = client.post(
            "/vault/keys",
            json={
                "vendor": "stripe",
                "daily_usd_cap": 1,
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "agent_run_label": f"argo/{pasted}",
            },
        )
        metadata = client.post(
            "/vault/budgets",
            json={"agent_run_label": "argo/x", "total_usd_cap": 1, "metadata": {"note": pasted}},
        )
        calls = {
            where: client.post(
                f"/stripe/v1/payment_intents{suffix}",
                content=b"amount=100&currency=usd",
                headers={"Authorization": f"Bearer {vault_key}{tag}", **FORM, **headers},
            )
            for where, suffix, tag, headers in (
                ("path", f"/{pasted}", "", {}),
                ("caller tag", "", f".{pasted}", {}),
                ("idempotency key", "", "", {"Idempotency-Key": f"retry-{pasted}"}),
            )
        }
        rows = client.get("/vault/audit").json()["data"]
    assert label.status_code == metadata.status_code == 400
    assert "holds a keybrake secret" in label.json()["error"]["message"]
    for where, response in calls.items():
        assert response.status_code == 400, where
        assert response.json()["error"]["code"] == "keybrake_secret_in_request"
        assert where in response.json()["error"]["message"]
    assert upstream.sent == []  # nothing reached the vendor
    assert len(rows) == 3 and pasted not in json.dumps(rows)
    assert {r["decision"] for r in rows} == {"secret_in_request"}
