"""templates/observability/: the alerting rules pass `promtool check rules` and their unit tests
(`promtool test rules`, every alert fired and kept quiet), and every metric the rules and the
Grafana dashboard query is one the proxy's /metrics really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.fakes.stripe_upstream import FakeStripe
from tests.inproc import app_client, issue

FOLDER = Path(__file__).resolve().parent.parent / "templates" / "observability"
RULES = FOLDER / "prometheus-rules.yaml"
RULE_TESTS = FOLDER / "prometheus-rules.test.yaml"
DASHBOARD = FOLDER / "grafana-dashboard.json"
# Series Prometheus makes itself, not the proxy.
FROM_PROMETHEUS = {"up"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return promtool_in(FOLDER, *args)


def promtool_in(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # `make test` installs it (Debian package prometheus) when missing: never skipped.
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make test` installs it (apt-get install prometheus)"
    return subprocess.run(
        [binary, *args], cwd=folder, capture_output=True, text=True, check=False, timeout=120
    )


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return [rule["expr"] for rule in alerts()] + exprs


def test_the_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for alert in alerts():
        mine = [c for c in cases if c["alertname"] == alert["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{alert['alert']} never tested firing"
        assert any(not c["exp_alerts"] for c in mine), f"{alert['alert']} never tested quiet"


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: the same tests against a rule with the wrong threshold."""
    broken = RULES.read_text().replace("keybrake_database_up == 0", "keybrake_database_up == 1")
    (tmp_path / RULES.name).write_text(broken)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    done = promtool_in(tmp_path, "test", "rules", RULE_TESTS.name)
    assert done.returncode != 0 and "KeybrakeDatabaseUnavailable" in done.stdout + done.stderr


def test_every_metric_queried_exists_in_the_proxys_metrics(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    with app_client(tmp_path, stripe_api_base=fake_stripe.url) as client:
        key = issue(client, daily_usd_cap=1)
        auth = {"Authorization": f"Bearer {key['vault_key']}"}
        form = {"amount": "100", "currency": "usd"}
        client.post("/stripe/v1/payment_intents", data=form, headers=auth)
        client.post("/stripe/v1/payment_intents", data={**form, "n": "2"}, headers=auth)
        text = client.get("/metrics", headers={"Authorization": ""}).text
    exposed = set(re.findall(r"^([a-z_][a-z0-9_]*)(?:\{| )", text, flags=re.M))
    wanted = {
        name for expr in queries() for name in re.findall(r"\b(keybrake_[a-z0-9_]+|up)\b", expr)
    }
    assert {"keybrake_calls_total", "keybrake_database_up", "up"} <= wanted
    missing = sorted(wanted - exposed - FROM_PROMETHEUS)
    assert not missing, f"queried but not in /metrics: {missing}"


def test_the_dashboard_is_a_grafana_dashboard_on_a_chosen_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "keybrake"
    [variable] = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 6
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])


def test_every_query_parses(tmp_path: Path) -> None:
    """promtool parses every alert and dashboard query, in one run: each is a recording rule of
    one throwaway file, named after its position, so a failure names the query."""
    exprs = queries()
    rules = [{"record": f"probe:q{n}", "expr": expr} for n, expr in enumerate(exprs)]
    (tmp_path / "probe.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "probe", "rules": rules}]})
    )
    done = promtool_in(tmp_path, "check", "rules", "probe.yaml")
    assert done.returncode == 0, (
        done.stdout
        + done.stderr
        + "\n"
        + "\n".join(f"q{n}: {expr}" for n, expr in enumerate(exprs))
    )
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


def test_the_cap_hit_alert_counts_exactly_the_cap_hits() -> None:
    """The rule's decision pattern names the decision module's cap hits, no more, no fewer."""
    from keybrake.proxy.decisions import CAP_HITS, Decision

    exprs = [rule["expr"] for rule in alerts() if "cap_hit" in rule["expr"]]
    assert exprs
    for expr in exprs:
        pattern = re.search(r'decision=~"([^"]+)"', expr)
        assert pattern is not None, expr
        matched = {d for d in Decision if re.fullmatch(pattern.group(1), d.value)}
        assert matched == set(CAP_HITS), expr
