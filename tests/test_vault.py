"""The vault service behind the admin API and the dashboard: its boundaries."""

from __future__ import annotations

import subprocess
import sys

# What serves vendor calls: the admin side needs none of it.
REQUEST_PATH = (
    "keybrake.proxy.pipeline",
    "keybrake.proxy.pricing",
    "keybrake.proxy.upstream",
    "keybrake.proxy.vendors",
    "keybrake.proxy.metrics",
)


def test_the_admin_api_and_the_vault_load_nothing_of_the_request_path() -> None:
    script = (
        "import sys, keybrake.proxy.admin, keybrake.proxy.vault; "
        "print('\\n'.join(m for m in sys.modules if m.startswith('keybrake.')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "keybrake.proxy.vault" in loaded  # the check sees what was imported
    leaked = [m for m in loaded if m.startswith(REQUEST_PATH)]
    assert leaked == []


def test_every_vault_refusal_renders_as_the_one_error_envelope() -> None:
    """Each refusal class carries its HTTP status and error type; the admin API renders them
    all through one function, with the rule broken as `code` when there is one."""
    import json

    from keybrake.proxy.admin import error
    from keybrake.proxy.errors import (
        Conflict,
        Forbidden,
        IdempotencyMismatch,
        InvalidRequest,
        LoginRefused,
        NotFound,
        VaultError,
    )

    cases: list[tuple[VaultError, int, dict[str, str]]] = [
        (
            InvalidRequest("limit: no"),
            400,
            {"type": "invalid_request_error", "message": "limit: no"},
        ),
        (
            InvalidRequest("slow", status=408),
            408,
            {"type": "invalid_request_error", "message": "slow"},
        ),
        (NotFound("no key"), 404, {"type": "not_found", "message": "no key"}),
        (Conflict("revoked"), 409, {"type": "conflict", "message": "revoked"}),
        (LoginRefused("who?"), 401, {"type": "authentication_error", "message": "who?"}),
        (
            Forbidden("max_daily_usd_cap", "at most $100"),
            403,
            {"type": "permission_error", "code": "max_daily_usd_cap", "message": "at most $100"},
        ),
    ]
    for exc, status, body in cases:
        answer = error(exc.status, exc.error_type, exc.message, exc.code)
        assert answer.status_code == status
        assert json.loads(bytes(answer.body)) == {"error": body}
        assert list(json.loads(bytes(answer.body))["error"]) == list(body)  # the order too
    mismatch = IdempotencyMismatch()
    assert (mismatch.status, mismatch.error_type) == (400, "idempotency_error")
