"""A database that cannot take a call and a bug in our code are answered differently.

The database's own errors mean "unavailable": 503, nothing forwarded, try again. Anything else
raised on the way is a bug: logged with its traceback, answered 500 `internal_error` with nothing
forwarded, and never passed off as "the database is unreachable" (a retry meets the same bug).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from keybrake.proxy.store import operations, postgres, sqlite_ledger
from tests.inproc import StubUpstream, app_client, issue

FORM = {"content-type": "application/x-www-form-urlencoded"}


def _url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'errors.db'}"
    return str(request.getfixturevalue("pg_url"))


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise ZeroDivisionError("a bug in the ledger's code")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_bug_on_the_request_path_is_a_500_and_forwards_nothing(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub = StubUpstream()
    with app_client(tmp_path, upstream=stub, database_url=_url(backend, tmp_path, request)) as c:
        key = issue(c)["vault_key"]
        if backend == "sqlite":
            # Inside the writer thread's transaction, where any error used to become a 503.
            monkeypatch.setattr(sqlite_ledger, "admit", _bug)
        else:
            monkeypatch.setattr(postgres, "_DECISIONS", {})  # reading the function's answer
        answer = c.post(
            "/stripe/v1/payment_intents",
            content="amount=100&currency=usd",
            headers={**FORM, "Authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 500, answer.text
        assert answer.json()["error"]["code"] == "keybrake_internal_error"
        assert "unreachable" not in answer.text and "Traceback" not in answer.text
        assert stub.sent == []
        assert c.get("/readyz").status_code == 200  # the database is fine
        logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
        logged += [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyError]
        assert logged, "the bug is logged with its traceback"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_bug_in_a_store_operation_is_a_500_on_the_admin_api(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with app_client(tmp_path, database_url=_url(backend, tmp_path, request)) as c:
        key_id = issue(c)["key_id"]
        monkeypatch.setattr(operations, "_changes", _bug)  # our code, not the database
        answer = c.get(f"/vault/keys/{key_id}")
        assert answer.status_code == 500, answer.text
        assert answer.json()["error"]["type"] == "internal_error"
        assert "ZeroDivision" not in answer.text
        assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
        monkeypatch.undo()
        assert c.get(f"/vault/keys/{key_id}").status_code == 200
