"""The step scripts' own logic, called in-process against a stand-in proxy (fake_keybrake):
retries with backoff on transient errors, the server's message on a 4xx, input checks, and a
revoke that always exits 0. Sleeping is replaced by recording the delays."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_keybrake import ADMIN_TOKEN, FakeKeybrake, serve

from keybrake.hera_workflows import _step_common, _step_issue, _step_revoke
from tests.fakes.kubernetes import FakeCluster


@pytest.fixture
def fake() -> Iterator[FakeKeybrake]:
    proxy = FakeKeybrake()
    server = serve(proxy)
    yield proxy
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens: connection refused, deterministically."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def issue_env(url: str, out: Path, **overrides: str) -> dict[str, str]:
    return {
        "KEYBRAKE_URL": url,
        "KEYBRAKE_API_KEY": ADMIN_TOKEN,
        "KEYBRAKE_VENDOR": "stripe",
        "KEYBRAKE_DAILY_USD_CAP": "300",
        "KEYBRAKE_ALLOWED_ENDPOINTS": '["POST /v1/payment_intents"]',
        "KEYBRAKE_EXPIRES_IN": "2h",
        "KEYBRAKE_MAX_USD_PER_CALL": "",
        "KEYBRAKE_DELIVERY": "parameter",
        "KEYBRAKE_REQUEST_ID": "uid-1/issue-vault-key",
        "KEYBRAKE_LABEL": "argo/wf-1",
        "KEYBRAKE_WORKFLOW_NAME": "wf-1",
        "KEYBRAKE_WORKFLOW_NAMESPACE": "billing",
        "KEYBRAKE_WORKFLOW_UID": "uid-1",
        "KEYBRAKE_OUTPUT_DIR": str(out),
        **overrides,
    }


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_issue_posts_the_request_and_writes_the_outputs(
    fake: FakeKeybrake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = issue_env(fake.url, tmp_path, KEYBRAKE_MAX_USD_PER_CALL="12.50")
    assert _step_issue.main(env, Sleeps()) == 0
    [request] = fake.requests
    assert (request.method, request.path) == ("POST", "/vault/keys")
    assert request.authorization == f"Bearer {ADMIN_TOKEN}"
    assert request.body == {
        "vendor": "stripe",
        "daily_usd_cap": "300",
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "2h",
        "agent_run_label": "argo/wf-1",
        "max_usd_per_call": "12.50",
        "metadata": {"workflow": "wf-1", "namespace": "billing", "uid": "uid-1"},
        "namespace": "billing",
    }
    assert request.idempotency_key == "uid-1/issue-vault-key"  # the same on every retry
    assert (tmp_path / "key_id").read_text() == "vk_1"
    assert (tmp_path / "vault_key").read_text() == "kbv_secret_vk_1"
    printed = capsys.readouterr()
    assert "issued vk_1" in printed.out
    assert "kbv_secret" not in printed.out + printed.err  # the vault key is never logged


def test_issue_retries_transient_errors_with_backoff(fake: FakeKeybrake, tmp_path: Path) -> None:
    fake.script = [(503, {"error": {"type": "unavailable", "message": "starting"}}), (502, None)]
    sleeps = Sleeps()
    assert _step_issue.main(issue_env(fake.url, tmp_path), sleeps) == 0
    assert sleeps == [1.0, 2.0]
    assert len(fake.requests) == 3


def test_issue_gives_up_on_an_unreachable_proxy_with_exit_75(
    closed_port_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sleeps = Sleeps()
    assert _step_issue.main(issue_env(closed_port_url, tmp_path), sleeps) == 75
    assert sleeps == list(_step_common.BACKOFF_SECONDS)
    assert "after 6 attempts" in capsys.readouterr().err
    assert not (tmp_path / "key_id").exists()


def test_issue_fails_a_4xx_with_the_servers_message_and_exit_77(
    fake: FakeKeybrake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = issue_env(fake.url, tmp_path, KEYBRAKE_API_KEY="wrong")
    assert _step_issue.main(env, Sleeps()) == 77
    assert "HTTP 401: bad admin token (unauthorized)" in capsys.readouterr().err
    assert len(fake.requests) == 1  # a 4xx is never retried


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"KEYBRAKE_DAILY_USD_CAP": "-1"}, "positive dollar amount"),
        ({"KEYBRAKE_DAILY_USD_CAP": "NaN"}, "positive dollar amount"),
        ({"KEYBRAKE_DAILY_USD_CAP": "three"}, "dollar amount such as 300"),
        ({"KEYBRAKE_ALLOWED_ENDPOINTS": "POST /v1/x"}, "JSON list of strings"),
        ({"KEYBRAKE_ALLOWED_ENDPOINTS": "[]"}, "non-empty JSON list"),
        ({"KEYBRAKE_API_KEY": ""}, "keybrake-credentials"),
        ({"KEYBRAKE_VENDOR": "{{inputs.parameters.vendor}}"}, "KEYBRAKE_VENDOR is empty"),
        ({"KEYBRAKE_URL": "file:///etc/passwd"}, "must start with http"),
        ({"KEYBRAKE_DAILY_USD_CAP": "", "KEYBRAKE_BUDGET_ID": ""}, "or a budget_id"),
        (
            {"KEYBRAKE_ISSUE": "budget", "KEYBRAKE_DAILY_USD_CAP": ""},
            "cannot issue a budget: give total_usd_cap (the run's whole life)",
        ),
        ({"KEYBRAKE_ISSUE": "budget", "KEYBRAKE_TOTAL_USD_CAP": "0"}, "positive dollar amount"),
        ({"KEYBRAKE_ISSUE": "budget", "KEYBRAKE_DAILY_USD_CAP": "Infinity"}, "positive dollar"),
        ({"KEYBRAKE_CONSTRAINTS": "customers=cus_1"}, "KEYBRAKE_CONSTRAINTS must be a JSON object"),
        ({"KEYBRAKE_CONSTRAINTS": '["cus_1"]'}, 'must be a JSON object such as {"customers"'),
        (
            {"KEYBRAKE_ISSUE": "budget", "KEYBRAKE_CONSTRAINTS": "null"},
            "cannot issue a budget: KEYBRAKE_CONSTRAINTS must be a JSON object",
        ),
    ],
)
def test_issue_refuses_bad_inputs_before_calling(
    fake: FakeKeybrake,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, str],
    message: str,
) -> None:
    code = _step_issue.main(issue_env(fake.url, tmp_path, **overrides), Sleeps())
    assert code in (75, 77)
    assert message in capsys.readouterr().err
    assert fake.requests == []


def test_issue_reports_outputs_it_cannot_write(
    fake: FakeKeybrake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert _step_issue.main(issue_env(fake.url, blocked / "out"), Sleeps()) == 1
    assert "revokes it by label argo/wf-1" in capsys.readouterr().err
    assert fake.keys["vk_1"]["status"] == "active"


def revoke_env(url: str, out: Path, **overrides: str) -> dict[str, str]:
    return {
        "KEYBRAKE_URL": url,
        "KEYBRAKE_API_KEY": ADMIN_TOKEN,
        "KEYBRAKE_KEY_ID": "vk_1",
        "KEYBRAKE_LABEL": "argo/wf-1",
        "KEYBRAKE_WORKFLOW_STATUS": "Succeeded",
        "KEYBRAKE_OUTPUT_DIR": str(out),
        **overrides,
    }


def issued(fake: FakeKeybrake, tmp_path: Path, label: str = "argo/wf-1") -> str:
    env = issue_env(fake.url, tmp_path / "issue", KEYBRAKE_LABEL=label)
    assert _step_issue.main(env, Sleeps()) == 0
    return (tmp_path / "issue" / "key_id").read_text()


def summary(out: Path) -> str:
    return (out / "summary").read_text()


def test_revoke_by_key_id_prints_the_spend(fake: FakeKeybrake, tmp_path: Path) -> None:
    key_id = issued(fake, tmp_path)
    fake.keys[key_id].update(spent_usd="12.40", calls=7, cap_hits=1)
    assert _step_revoke.main(revoke_env(fake.url, tmp_path, KEYBRAKE_KEY_ID=key_id), Sleeps()) == 0
    assert fake.keys[key_id]["status"] == "revoked"
    assert summary(tmp_path) == (
        "keybrake: key vk_1 revoked: spent $12.40 of $300.00 cap, 7 calls, 1 cap hit "
        "(workflow Succeeded)"
    )
    # a second run (Argo retried the exit handler) is still fine
    assert _step_revoke.main(revoke_env(fake.url, tmp_path, KEYBRAKE_KEY_ID=key_id), Sleeps()) == 0
    assert "revoked" in summary(tmp_path)


def test_revoke_falls_back_to_the_label_when_the_key_id_is_unresolved(
    fake: FakeKeybrake, tmp_path: Path
) -> None:
    issued(fake, tmp_path)
    issued(fake, tmp_path, label="argo/another-run")
    env = revoke_env(
        fake.url, tmp_path, KEYBRAKE_KEY_ID="{{workflow.outputs.parameters.keybrake_key_id}}"
    )
    assert _step_revoke.main(env, Sleeps()) == 0
    assert [(r.method, r.path, r.body) for r in fake.requests[-1:]] == [
        ("POST", "/vault/keys/revoke", {"agent_run_label": "argo/wf-1"})
    ]
    assert fake.keys["vk_1"]["status"] == "revoked"
    assert fake.keys["vk_2"]["status"] == "active"
    assert "no id, revoked 1 key(s) labelled argo/wf-1" in summary(tmp_path)


def test_revoke_with_nothing_issued_is_done(fake: FakeKeybrake, tmp_path: Path) -> None:
    assert _step_revoke.main(revoke_env(fake.url, tmp_path, KEYBRAKE_KEY_ID=""), Sleeps()) == 0
    assert "no id and nothing active labelled argo/wf-1: nothing to revoke" in summary(tmp_path)
    assert _step_revoke.main(revoke_env(fake.url, tmp_path, KEYBRAKE_KEY_ID="vk_9"), Sleeps()) == 0
    assert "vk_9 is unknown to the proxy: nothing to revoke" in summary(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "answer", "message"),
    [
        (
            {"KEYBRAKE_API_KEY": ""},
            None,
            "KEYBRAKE_API_KEY (an issuer token from a Secret, default keybrake-credentials",
        ),
        ({"KEYBRAKE_API_KEY": "wrong"}, None, "HTTP 401: bad admin token"),
        ({}, (500, {"error": {"type": "x", "message": "boom"}}), "failed after 6 attempts"),
        ({}, (200, ["not", "an", "object"]), "could not revoke vk_1"),
        ({"KEYBRAKE_KEY_ID": "", "KEYBRAKE_LABEL": ""}, None, "neither an id nor"),
    ],
)
def test_revoke_never_fails_the_workflow(
    fake: FakeKeybrake,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, str],
    answer: tuple[int, Any] | None,
    message: str,
) -> None:
    if answer is not None:
        fake.script = [answer] * 6
    assert _step_revoke.main(revoke_env(fake.url, tmp_path, **overrides), Sleeps()) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "WARNING" in line and message in line
    assert summary(tmp_path) == line


def test_revoke_survives_an_unexpected_error(
    fake: FakeKeybrake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any) -> str:
        raise KeyError("surprise")

    monkeypatch.setattr(_step_revoke, "revoke_by_id", explode)
    assert _step_revoke.main(revoke_env(fake.url, tmp_path), Sleeps()) == 0
    assert "WARNING: could not revoke: KeyError" in summary(tmp_path)


def test_issue_sends_only_the_caps_given_and_the_budget_drawn_on(
    fake: FakeKeybrake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = issue_env(
        fake.url,
        tmp_path,
        KEYBRAKE_DAILY_USD_CAP="",
        KEYBRAKE_MAX_USD_PER_CALLER="10",
        KEYBRAKE_BUDGET_ID="bg_7",
    )
    assert _step_issue.main(env, Sleeps()) == 0
    body = fake.requests[-1].body
    assert {k: body[k] for k in ("max_usd_per_caller", "budget_id")} == {
        "max_usd_per_caller": "10",
        "budget_id": "bg_7",
    }
    assert "daily_usd_cap" not in body and "total_usd_cap" not in body
    assert "$10.00 per pod, on budget bg_7" in capsys.readouterr().out


def budget_env(url: str, out: Path, **overrides: str) -> dict[str, str]:
    return {
        "KEYBRAKE_ISSUE": "budget",
        "KEYBRAKE_URL": url,
        "KEYBRAKE_API_KEY": ADMIN_TOKEN,
        "KEYBRAKE_TOTAL_USD_CAP": "300",
        "KEYBRAKE_DAILY_USD_CAP": "",
        "KEYBRAKE_EXPIRES_IN": "6h",
        "KEYBRAKE_LABEL": "argo/wf-1",
        "KEYBRAKE_WORKFLOW_NAME": "wf-1",
        "KEYBRAKE_WORKFLOW_NAMESPACE": "billing",
        "KEYBRAKE_WORKFLOW_UID": "uid-1",
        "KEYBRAKE_OUTPUT_DIR": str(out),
        **overrides,
    }


def test_issue_budget_posts_the_request_and_writes_its_id(
    fake: FakeKeybrake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _step_issue.main(budget_env(fake.url, tmp_path), Sleeps()) == 0
    [request] = fake.requests
    assert (request.method, request.path) == ("POST", "/vault/budgets")
    assert request.body == {
        "agent_run_label": "argo/wf-1",
        "expires_in": "6h",
        "total_usd_cap": "300",
        "metadata": {"workflow": "wf-1", "namespace": "billing", "uid": "uid-1"},
        "namespace": "billing",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budget_id"]
    assert (tmp_path / "budget_id").read_text() == "bg_1"
    assert "issued bg_1 caps $300.00 total" in capsys.readouterr().out


# What the template's `constraints` input holds (a literal, or a workflow parameter Argo filled in).
CONSTRAINTS = '{"customers": ["cus_1", "cus_2"], "currencies": ["usd"], "mode": "report"}'


@pytest.mark.parametrize(
    ("env_of", "path"),
    [(issue_env, "/vault/keys"), (budget_env, "/vault/budgets")],
    ids=["key", "budget"],
)
def test_the_constraints_input_is_sent_unchanged_and_only_when_given(
    fake: FakeKeybrake,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    env_of: Any,
    path: str,
) -> None:
    given = env_of(fake.url, tmp_path / "given", KEYBRAKE_CONSTRAINTS=f"  {CONSTRAINTS}\n")
    assert _step_issue.main(given, Sleeps()) == 0
    request = fake.requests[-1]
    assert request.path == path
    assert request.body["constraints"] == json.loads(CONSTRAINTS)  # as given: the proxy checks it
    assert "constrained by currencies, customers (report only)" in capsys.readouterr().out
    # Empty (the template's default), unresolved or missing: the request has no such field, as
    # before the input existed.
    for value in ("", "  ", "{{inputs.parameters.constraints}}", None):
        env = env_of(fake.url, tmp_path / "empty", KEYBRAKE_CONSTRAINTS=value or "")
        if value is None:
            del env["KEYBRAKE_CONSTRAINTS"]
        assert _step_issue.main(env, Sleeps()) == 0
        assert "constraints" not in fake.requests[-1].body
        assert "constrained" not in capsys.readouterr().out


def test_revoke_revokes_the_budget_and_so_every_key_on_it(
    fake: FakeKeybrake, tmp_path: Path
) -> None:
    assert _step_issue.main(budget_env(fake.url, tmp_path / "b"), Sleeps()) == 0
    budget_id = (tmp_path / "b" / "budget_id").read_text()
    for vendor in ("stripe", "resend"):
        env = issue_env(
            fake.url,
            tmp_path / vendor,
            KEYBRAKE_VENDOR=vendor,
            KEYBRAKE_DAILY_USD_CAP="",
            KEYBRAKE_BUDGET_ID=budget_id,
        )
        assert _step_issue.main(env, Sleeps()) == 0
    fake.budgets[budget_id].update(total_spent_usd="212.50", calls=9, cap_hits=2)
    # the key id global names the last key issued; the budget covers both, in one call
    env = revoke_env(fake.url, tmp_path, KEYBRAKE_KEY_ID="vk_3", KEYBRAKE_BUDGET_ID=budget_id)
    assert _step_revoke.main(env, Sleeps()) == 0
    assert {k["status"] for k in fake.keys.values()} == {"revoked"}
    assert fake.budgets[budget_id]["status"] == "revoked"
    assert [(r.method, r.path) for r in fake.requests[-1:]] == [("DELETE", "/vault/budgets/bg_1")]
    assert summary(tmp_path) == (
        "keybrake: budget bg_1 revoked with its 2 key(s): spent $212.50 of $300.00 cap, "
        "9 calls, 2 cap hits (workflow Succeeded)"
    )
    # a key of the run that does not draw on the budget is still revoked by its id
    key_id = issued(fake, tmp_path / "own")
    env = revoke_env(fake.url, tmp_path, KEYBRAKE_KEY_ID=key_id, KEYBRAKE_BUDGET_ID=budget_id)
    assert _step_revoke.main(env, Sleeps()) == 0
    assert fake.keys[key_id]["status"] == "revoked"
    assert f"; key {key_id} revoked" in summary(tmp_path)


def test_revoke_by_label_takes_the_runs_budgets_too(fake: FakeKeybrake, tmp_path: Path) -> None:
    assert _step_issue.main(budget_env(fake.url, tmp_path / "b"), Sleeps()) == 0
    env = revoke_env(
        fake.url,
        tmp_path,
        KEYBRAKE_KEY_ID="{{workflow.outputs.parameters.keybrake_key_id}}",
        KEYBRAKE_BUDGET_ID="",
    )
    assert _step_revoke.main(env, Sleeps()) == 0
    assert fake.budgets["bg_1"]["status"] == "revoked"
    assert "no id, revoked 0 key(s) and 1 budget(s) labelled argo/wf-1" in summary(tmp_path)


def test_spend_keeps_sub_cent_amounts() -> None:
    keys = [{"spent_usd": "0.0083", "daily_usd_cap": "1.00", "calls": 1, "cap_hits": 0}]
    assert _step_revoke.spend(keys) == "spent $0.0083 of $1.00 cap, 1 call, 0 cap hits"
    keys.append({"spent_usd": "2.5", "daily_usd_cap": "3", "calls": 2, "cap_hits": 1})
    assert _step_revoke.spend(keys) == "spent $2.5083 of $4.00 cap, 3 calls, 1 cap hit"


def test_an_unreadable_answer_is_reported_not_raised(fake: FakeKeybrake) -> None:
    assert _step_common.decode(b"<html>bad gateway</html>") == {
        "error": {"type": "not_json", "message": "<html>bad gateway</html>"}
    }
    assert _step_common.error_message({"error": {"message": "m"}}) == "m"
    assert _step_common.error_message(json.loads("[1]")) == ""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FakeCluster]:
    fake = FakeCluster(tmp_path / "cluster")
    yield fake
    fake.stop()


def in_cluster_env(
    cluster: FakeCluster, folder: Path, account: str = "keybrake-issuer"
) -> dict[str, str]:
    """What the kubelet gives the issue pod: the API server's address and the service account's
    token and CA, mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text(cluster.token("billing", account, audience=cluster.issuer))
    (folder / "ca.crt").write_bytes(cluster.ca_file.read_bytes())
    host, port = cluster.url.removeprefix("https://").rsplit(":", 1)
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KEYBRAKE_KUBE_DIR": str(folder),
        "KEYBRAKE_DELIVERY": "secret",
    }


def test_delivery_secret_stores_the_key_in_a_secret_owned_by_the_run(
    fake: FakeKeybrake, cluster: FakeCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.allow("billing", "keybrake-issuer", "create")
    env = {**issue_env(fake.url, tmp_path / "out"), **in_cluster_env(cluster, tmp_path / "sa")}
    assert _step_issue.main(env, Sleeps()) == 0
    name = (tmp_path / "out" / "vault_key_secret").read_text()
    assert name.startswith("keybrake-uid-1-") and not (tmp_path / "out" / "vault_key").exists()
    secret = cluster.secrets[("billing", name)]
    assert cluster.secret_value("billing", name, "vault_key") == "kbv_secret_vk_1"
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Workflow",
            "name": "wf-1",
            "uid": "uid-1",
            "blockOwnerDeletion": False,
        }
    ]
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "keybrake"
    creators = {r.user for r in cluster.requests if r.method == "POST"}
    assert creators == {"system:serviceaccount:billing:keybrake-issuer"}
    printed = capsys.readouterr()
    assert f"in Secret {name}" in printed.out and "kbv_secret" not in printed.out + printed.err
    # The step's retry (its pod died after the first Secret was made): the next name, same
    # request id, so the proxy replaces the key instead of adding one.
    (tmp_path / "out" / "vault_key_secret").unlink()
    assert _step_issue.main(env, Sleeps()) == 0
    assert (tmp_path / "out" / "vault_key_secret").read_text() == f"{name}-2"
    assert [r.idempotency_key for r in fake.requests] == ["uid-1/issue-vault-key"] * 2


def test_a_key_that_cannot_be_delivered_is_revoked_at_once(
    fake: FakeKeybrake, cluster: FakeCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No RBAC for this service account: the API server answers 403.
    env = {**issue_env(fake.url, tmp_path / "out"), **in_cluster_env(cluster, tmp_path / "sa")}
    assert _step_issue.main(env, Sleeps()) == 77
    assert fake.keys["vk_1"]["status"] == "revoked"
    err = capsys.readouterr().err
    assert "cannot create resource" in err and "templates/rbac/keybrake-issuer.yaml" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_delivery_secret_outside_a_cluster_is_refused_before_issuing(
    fake: FakeKeybrake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = issue_env(fake.url, tmp_path, KEYBRAKE_DELIVERY="secret")
    assert _step_issue.main(env, Sleeps()) == 77
    assert fake.requests == [] and "use delivery parameter" in capsys.readouterr().err


def test_the_steps_present_the_projected_token_read_from_its_file(
    fake: FakeKeybrake, cluster: FakeCluster, tmp_path: Path
) -> None:
    token_file = tmp_path / "keybrake-token"
    token_file.write_text(cluster.token("billing", "keybrake-issuer") + "\n")
    fake.accept = lambda token: token == token_file.read_text().strip()
    env = issue_env(
        fake.url, tmp_path / "out", KEYBRAKE_API_KEY="", KEYBRAKE_TOKEN_FILE=str(token_file)
    )
    assert _step_issue.main(env, Sleeps()) == 0
    revoke = revoke_env(
        fake.url, tmp_path, KEYBRAKE_API_KEY="", KEYBRAKE_TOKEN_FILE=str(token_file)
    )
    assert _step_revoke.main(revoke, Sleeps()) == 0
    assert fake.keys["vk_1"]["status"] == "revoked"
    assert {r.authorization for r in fake.requests} == {f"Bearer {token_file.read_text().strip()}"}
    missing = issue_env(fake.url, tmp_path / "o2", KEYBRAKE_TOKEN_FILE=str(tmp_path / "nope"))
    assert _step_issue.main(missing, Sleeps()) == 77


def test_the_steps_check_an_https_proxy_against_the_ca_bundle(tmp_path: Path) -> None:
    """An https proxy whose certificate a private CA signed: refused as unavailable (exit 75,
    after the retries) unless KEYBRAKE_CA_BUNDLE names that CA; then the key is issued."""
    from tests.fakes.pki import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "pki")
    cert = ca.server_cert("proxy")
    fake = FakeKeybrake()
    server = serve(fake, tls=(cert.cert_file, cert.key_file))
    try:
        assert fake.url.startswith("https://")
        env = issue_env(fake.url, tmp_path / "out")
        untrusted = _step_issue.main(env, Sleeps())
        assert fake.requests == []  # no request got past the TLS handshake
        trusted = _step_issue.main({**env, "KEYBRAKE_CA_BUNDLE": str(ca.ca_file)}, Sleeps())
    finally:
        server.shutdown()
        server.server_close()
    assert (untrusted, trusted) == (75, 0)
    assert [(r.method, r.path) for r in fake.requests] == [("POST", "/vault/keys")]
