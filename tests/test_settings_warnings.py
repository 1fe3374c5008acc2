"""Settings that say when they are wrong: an unknown KEYBRAKE_ variable is warned of at
`keybrake serve` with the setting it likely misspells (never its value); a settings file's
unknown name says "did you mean"; an issuer bound to Kubernetes identities while that login is
off is created with a warning, which `keybrake issuers create` prints on stderr."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer.testing

from keybrake.cli.main import app
from keybrake.proxy.settings import Settings, unknown_variables
from tests.inproc import app_client
from tests.proxyproc import ADMIN_KEY
from tests.served import serve_proxy

runner = typer.testing.CliRunner()

SECRET = "sk_live_do_not_print_me_0123456789"
BINDING = {"namespaces": ["payments"], "service_accounts": ["keybrake-issuer"]}


def _serve(tmp_path: Path, extra: dict[str, str]) -> list[str]:
    """`keybrake serve` with only `extra` among KEYBRAKE_ variables (the test run's own, such as
    KEYBRAKE_TEST_BACKENDS, left out), refused after the settings parse (a missing pricing file),
    so that no server starts: its stderr lines."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.upper().startswith("KEYBRAKE_")}
    env |= {
        "KEYBRAKE_API_KEY": "x",
        "KEYBRAKE_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "KEYBRAKE_PRICING_FILE": str(tmp_path / "missing.toml"),
        **extra,
    }
    result = runner.invoke(app, ["serve"], env=env)
    assert result.exit_code == 2 and "missing.toml" in result.stderr, result.output
    return result.stderr.strip().splitlines()


def test_serve_warns_of_each_unknown_variable_with_the_closest_setting(tmp_path: Path) -> None:
    lines = _serve(
        tmp_path,
        {"KEYBRAKE_STRIPE_KEY": SECRET, "KEYBRAKE_APIKEY": SECRET, "KEYBRAKE_WIDGETS": SECRET},
    )
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [
        "warning: KEYBRAKE_APIKEY is not a keybrake setting and is ignored; did you mean "
        "KEYBRAKE_API_KEY?",
        "warning: KEYBRAKE_STRIPE_KEY is not a keybrake setting and is ignored; did you mean "
        "KEYBRAKE_STRIPE_SECRET_KEY?",
        "warning: KEYBRAKE_WIDGETS is not a keybrake setting and is ignored",
    ]
    assert all(SECRET not in line for line in lines)


def test_serve_is_silent_about_settings_command_variables_and_service_links(
    tmp_path: Path,
) -> None:
    known = {
        # settings, in any case (pydantic reads them so), and --config's own
        "KEYBRAKE_STRIPE_SECRET_KEY": SECRET,
        "keybrake_max_ttl": "7d",
        "KEYBRAKE_CONFIG": "",
        # the commands' own: the client's and the reaper's
        "KEYBRAKE_URL": "http://keybrake:8080",
        "KEYBRAKE_CA_BUNDLE": str(tmp_path / "ca.pem"),
        "KEYBRAKE_CLUSTER": "prod",
        "KEYBRAKE_REAPER_GRACE": "5m",
        # what a Service named keybrake with a port named http injects (kubelet's envvars)
        "KEYBRAKE_SERVICE_HOST": "10.0.0.11",
        "KEYBRAKE_SERVICE_PORT": "8080",
        "KEYBRAKE_SERVICE_PORT_HTTP": "8080",
        "KEYBRAKE_PORT": "tcp://10.0.0.11:8080",
        "KEYBRAKE_PORT_8080_TCP": "tcp://10.0.0.11:8080",
        "KEYBRAKE_PORT_8080_TCP_PROTO": "tcp",
        "KEYBRAKE_PORT_8080_TCP_PORT": "8080",
        "KEYBRAKE_PORT_8080_TCP_ADDR": "10.0.0.11",
        "KEYBRAKE_PORT_9090_UDP_ADDR": "10.0.0.11",
    }
    lines = _serve(tmp_path, known)
    assert [line for line in lines if line.startswith("warning:")] == []


def test_unknown_variables_looks_at_names_only() -> None:
    every = {f"KEYBRAKE_{name.upper()}": "x" for name in Settings.model_fields}
    environ = {
        **every,
        "KEYBRAKE_URL": "x",
        "KEYBRAKE_PORT_8080_TCP_HOST": "x",  # no such service link
        "KEYBRAKE_STRIPE_SECRT_KEY": SECRET,
        "HOME": "/root",
    }
    assert unknown_variables(environ, {"KEYBRAKE_URL"}) == [
        ("KEYBRAKE_PORT_8080_TCP_HOST", None),
        ("KEYBRAKE_STRIPE_SECRT_KEY", "KEYBRAKE_STRIPE_SECRET_KEY"),
    ]


def test_serve_refused_for_a_bad_value_says_only_that(tmp_path: Path) -> None:
    """The warnings come once the settings parse: a refused start stays one line."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.upper().startswith("KEYBRAKE_")}
    env |= {"KEYBRAKE_API_KEY": "x", "KEYBRAKE_MAX_TTL": "forever", "KEYBRAKE_WIDGETS": "1"}
    result = runner.invoke(app, ["serve"], env=env)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: KEYBRAKE_MAX_TTL: ")


def test_a_settings_files_unknown_name_says_did_you_mean(tmp_path: Path) -> None:
    typo = tmp_path / "typo.env"
    typo.write_text(f"KEYBRAKE_API_KEY=x\nKEYBRAKE_STRIPE_SECRT_KEY={SECRET}\n")
    result = runner.invoke(app, ["serve", "--config", str(typo)], env={"KEYBRAKE_API_KEY": ""})
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: settings file {typo}: unknown setting 'KEYBRAKE_STRIPE_SECRT_KEY'; did you "
        "mean KEYBRAKE_STRIPE_SECRET_KEY?"
    ]
    # Nothing close: the names it knows, as before.
    far = tmp_path / "far.env"
    far.write_text("KEYBRAKE_WIDGETS=3\n")
    result = runner.invoke(app, ["serve", "--config", str(far)], env={"KEYBRAKE_API_KEY": ""})
    assert result.exit_code == 2
    assert "unknown setting 'KEYBRAKE_WIDGETS'; known: KEYBRAKE_ALERT_INTERVAL" in result.stderr
    assert "did you mean" not in result.stderr


def _create(client: Any, **spec: Any) -> dict[str, Any]:
    response = client.post("/vault/issuers", json={"label_prefix": "argo/", **spec})
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_an_issuer_bound_while_kubernetes_login_is_off_is_created_with_a_warning(
    tmp_path: Path,
) -> None:
    with app_client(tmp_path) as client:
        bound = _create(client, name="bound", kubernetes=BINDING)
        both = _create(
            client,
            name="both",
            kubernetes={**BINDING, "namespaces": ["growth"]},
            static_token=True,
        )
        plain = _create(client, name="plain")
        shown = client.get(f"/vault/issuers/{bound['issuer_id']}").json()
    (warning,) = bound["warnings"]
    assert warning.startswith("kubernetes: Kubernetes service-account login is off")
    assert "KEYBRAKE_KUBERNETES_AUTH=off" in warning and "nothing can use it" in warning
    (warning,) = both["warnings"]
    assert "KEYBRAKE_KUBERNETES_AUTH=off" in warning and "nothing can use it" not in warning
    # Nothing to say: the answer as it always was, without the field.
    assert "warnings" not in plain and "warnings" not in shown
    assert set(plain) == set(shown) | {"issuer_token"}


def test_a_label_prefix_without_a_separator_is_created_with_a_warning(tmp_path: Path) -> None:
    """Labels match by prefix as text: `argo/team-a` also covers `argo/team-ab/...`."""
    with app_client(tmp_path) as client:
        open_ended = _create(client, name="team-a", label_prefix="argo/team-a")
        bounded = [
            _create(client, name=f"b{n}", label_prefix=prefix)
            for n, prefix in enumerate(["argo/team-b/", "argo/payments-", "argo/x."])
        ]
    assert open_ended["warnings"] == [
        "label_prefix: 'argo/team-a' is matched as text, so it also covers labels such as "
        "'argo/team-ax'; end it with '/' or '-' to stop at a boundary"
    ]
    assert not [issuer for issuer in bounded if "warnings" in issuer]


def test_an_issuer_bound_while_kubernetes_login_is_on_has_no_warning(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    with app_client(
        tmp_path,
        kubernetes_auth="tokenreview",
        kubernetes_api_url="https://127.0.0.1:9",
        kubernetes_token_file=tmp_path / "token",
    ) as client:
        bound = _create(client, name="bound", kubernetes=BINDING)
    assert "warnings" not in bound and bound["issuer_token"] is None


def test_issuers_create_prints_the_warning_on_stderr(tmp_path: Path) -> None:
    proxy = serve_proxy(tmp_path)
    env = {"KEYBRAKE_URL": proxy.url, "KEYBRAKE_API_KEY": ADMIN_KEY, "COLUMNS": "200"}
    create = ["issuers", "create", "--label-prefix", "argo/", "--k8s-service-account", "sa"]
    try:
        bound = runner.invoke(
            app, [*create, "--name", "bound", "--k8s-namespace", "payments", "-o", "json"], env=env
        )
        quiet = runner.invoke(
            app, [*create, "--name", "quiet", "--k8s-namespace", "growth", "-q"], env=env
        )
        plain = runner.invoke(
            app,
            ["issuers", "create", "--label-prefix", "argo/", "--name", "plain", "-o", "json"],
            env=env,
        )
    finally:
        proxy.stop()
    assert bound.exit_code == 0, bound.output
    assert bound.stderr.startswith("warning: kubernetes: Kubernetes service-account login is off")
    assert "KEYBRAKE_KUBERNETES_AUTH=off" in bound.stderr
    assert json.loads(bound.stdout)["name"] == "bound"  # stdout stays the JSON alone
    assert quiet.exit_code == 0 and quiet.stdout.strip().startswith("is_")
    assert "KEYBRAKE_KUBERNETES_AUTH=off" in quiet.stderr
    assert plain.exit_code == 0 and plain.stderr == ""
