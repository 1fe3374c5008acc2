"""`keybrake lint` and `wrap` on the odd workflows a review found them wrong on
(tests/adopt/edge/): fields of the wrong shape, YAML aliases, both exit handlers, handler and
entrypoint inputs, hyphenated parameters, vendor values that are no credentials, go-templates in
scripts, inline templates, a 22-level call graph, the file's own style (indentation, CRLF,
anchors), and YAML aliases standing for too many nodes (a "billion laughs" file). Each is held to
what docs/lint.md and docs/wrap.md say."""

from __future__ import annotations

import io
import json
import tracemalloc
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from keybrake.adopt.lint import lint_paths
from keybrake.adopt.wrap import WrapError, WrapOptions, wrap_text
from keybrake.cli.main import app

EDGE = Path(__file__).resolve().parent / "adopt" / "edge"
OPTIONS = WrapOptions(budget_usd=Decimal("5"))


def wrapped(name: str, options: WrapOptions = OPTIONS) -> tuple[str, dict[str, Any]]:
    text = (EDGE / "wrap" / name).read_bytes().decode()
    out = wrap_text(text, options).text
    assert wrap_text(out, options).text == out  # wrapping again changes nothing
    return out, YAML(typ="safe").load(io.StringIO(out))


def templates(document: dict[str, Any]) -> dict[str, Any]:
    return {t["name"]: t for t in document["spec"]["templates"]}


@pytest.mark.parametrize("path", sorted((EDGE / "shapes").glob("*.yaml")), ids=lambda p: p.name)
def test_a_field_of_the_wrong_shape_is_a_clear_error_never_a_traceback(path: Path) -> None:
    result = CliRunner().invoke(app, ["lint", str(path), "-o", "sarif"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code in (0, 1, 2)
    assert "Traceback" not in result.output
    wrap = CliRunner().invoke(app, ["wrap", str(path), "--budget-usd", "5"])
    assert wrap.exception is None or isinstance(wrap.exception, SystemExit), wrap.output
    assert wrap.exit_code in (0, 2)


def test_an_env_list_shared_by_an_alias_is_rewritten_once() -> None:
    _, document = wrapped("anchors.yaml")
    found = templates(document)
    for name in ("charge", "refund"):
        env = {e["name"]: e for e in found[name]["container"]["env"]}
        assert env["STRIPE_SECRET_KEY"]["value"].startswith("$(KEYBRAKE_VAULT_KEY_STRIPE_RAW)")


def test_values_of_a_vendor_that_are_no_credentials_stay() -> None:
    _, document = wrapped("twilio.yaml")
    env = {e["name"]: e for e in templates(document)["send"]["container"]["env"]}
    assert env["TWILIO_AUTH_TOKEN"]["value"].startswith("$(KEYBRAKE_VAULT_KEY_TWILIO_RAW)")
    for kept in ("TWILIO_ACCOUNT_SID", "TWILIO_MESSAGING_SERVICE_SID", "TWILIO_FROM_NUMBER"):
        assert "secretKeyRef" in env[kept]["valueFrom"], kept
    assert "secretKeyRef" in env["STRIPE_WEBHOOK_SECRET"]["valueFrom"]  # a signing secret
    assert "keybrake-stripe-key" not in templates(document)


def test_the_exit_handler_argo_runs_is_the_one_kept_and_gets_its_inputs() -> None:
    _, both = wrapped("both_exit.yaml")
    (first, *_) = templates(both)["keybrake-exit"]["dag"]["tasks"]
    assert first["template"] == "notify" and both["spec"]["onExit"] == "keybrake-exit"
    _, with_inputs = wrapped("exit_inputs.yaml")
    (first, *_) = templates(with_inputs)["keybrake-exit"]["dag"]["tasks"]
    assert first["arguments"]["parameters"] == [
        {"name": "channel", "value": "{{workflow.parameters.channel}}"}
    ]


def test_a_hyphenated_item_parameter_is_read_with_brackets() -> None:
    text, _ = wrapped("hyphen.yaml")
    assert "sprig.sha256sum(inputs.parameters['customer-ids'])" in text


def test_an_existing_base_url_is_pointed_at_the_proxy() -> None:
    _, document = wrapped("baseurl.yaml")
    (template,) = [t for t in document["spec"]["templates"] if "container" in t]
    env = {e["name"]: e for e in template["container"]["env"]}
    assert env["STRIPE_BASE_URL"]["value"].endswith("/stripe")
    assert "api.stripe.com" not in env["STRIPE_BASE_URL"]["value"]


def test_a_container_set_member_named_main() -> None:
    _, document = wrapped("cset.yaml")
    assert "keybrake-stripe-key" in templates(document)


def test_the_files_own_style_is_kept() -> None:
    four = (EDGE / "wrap" / "indent4.yaml").read_text()
    out, _ = wrapped("indent4.yaml")
    assert "        -   name: other" in out and "        -   name: other" in four
    crlf = (EDGE / "wrap" / "crlf.yaml").read_bytes().decode()
    assert "\r\n" in crlf
    out, _ = wrapped("crlf.yaml")
    assert out.count("\r\n") == out.count("\n")
    out, _ = wrapped("backoff.yaml")
    assert "&id" not in out and "*id" not in out  # no alias made up by the copy


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("inline.yaml", "inline template of step"),
        ("existing_kbmain.yaml", "already has templates keybrake-main"),
        ("entry_missing.yaml", "entrypoint 'nonexistent' is no template"),
        ("psp.yaml", "podSpecPatch"),
    ],
)
def test_refused(name: str, why: str) -> None:
    with pytest.raises(WrapError, match=why):
        wrap_text((EDGE / "wrap" / name).read_text(), OPTIONS)


def test_lint_on_the_same_files() -> None:
    report = lint_paths([EDGE / "wrap"])
    by_file: dict[str, set[tuple[str, str | None]]] = {}
    for finding in report.findings:
        by_file.setdefault(finding.path.name, set()).add((finding.rule, finding.template))
    # A go-template in a script is no Helm chart: the file is linted.
    assert ("KB101", "charge") in by_file["gotmpl.yaml"]
    assert not report.skipped
    # An inline template is linted as <template>/<step>.
    assert any(t and "/" in t for rule, t in by_file["inline.yaml"] if rule == "KB101")
    # No retry (limit 0) repeats nothing.
    assert not any(rule == "KB102" for rule, _ in by_file["limit0.yaml"])
    # A workflow-wide podSpecPatch reaches pod templates only.
    assert {t for rule, t in by_file["psp.yaml"] if rule == "KB101"} == {"work"}
    # onExit wins over hooks.exit: a revoke in hooks.exit does not count.
    assert ("KB104", None) in by_file["kb104.yaml"]
    # 22 levels of templates each calling the next twice: walked once each.
    assert ("KB101", "t22") in by_file["deep.yaml"]
    (deep,) = [f for f in report.findings if f.path.name == "deep.yaml" and f.rule == "KB101"]
    assert deep.severity == "high"  # fanned out 22 levels up


REVIEW2 = EDGE / "review2"


def test_an_http_template_sending_a_vendor_secret() -> None:
    report = lint_paths([REVIEW2 / "http.yaml"])
    found = {(f.rule, f.severity) for f in report.findings}
    assert {("KB101", "high"), ("KB102", "high"), ("KB103", "high"), ("KB105", "medium")} <= found
    with pytest.raises(WrapError, match="HTTP template"):
        wrap_text((REVIEW2 / "http.yaml").read_text(), OPTIONS)


def test_parallelism_must_bound_each_fanning_level() -> None:
    """On the fanned-out template itself it bounds nothing; nested, each level needs one."""
    for name in ("leafpar.yaml", "nested_inner_bounded.yaml"):
        rules = {f.rule for f in lint_paths([REVIEW2 / name]).findings}
        assert "KB105" in rules, name


def test_refusal_exit_code_keeps_onerror_and_joins_an_expression() -> None:
    options = WrapOptions(budget_usd=Decimal("5"), refusal_exit_code=77)
    _, document = wrapped("../review2/onerror.yaml", options)
    assert templates(document)["charge"]["retryStrategy"] == {"limit": 3, "retryPolicy": "OnError"}
    own = (
        (REVIEW2 / "onerror.yaml")
        .read_text()
        .replace(
            "retryPolicy: OnError",
            'retryPolicy: Always\n      expression: "lastRetry.status == \\"Failed\\""',
        )
    )
    strategy = templates(YAML(typ="safe").load(wrap_text(own, options).text))["charge"][
        "retryStrategy"
    ]
    assert strategy["expression"] == (
        '(lastRetry.status == "Failed") && asInt(lastRetry.exitCode) != 77'
    )


def test_a_wrapped_library_needs_its_callers_to_issue(tmp_path: Path) -> None:
    out = wrap_text((REVIEW2 / "lib_with_entry.yaml").read_text(), OPTIONS)
    assert any("must issue one too" in note for note in out.notes)
    folder = tmp_path
    (folder / "lib.yaml").write_text(out.text)
    (folder / "caller.yaml").write_text((REVIEW2 / "caller.yaml").read_text())
    report = lint_paths([folder])
    caller = [f for f in report.findings if f.path.name == "caller.yaml"]
    assert [f.rule for f in caller] == ["KB103"]
    assert "payments/charge (templateRef)" in caller[0].message


def test_yaml_nested_too_deep_is_a_clear_error(tmp_path: Path) -> None:
    for name, text in (
        # 3000 levels, one flow sequence a line.
        ("deep.yaml", "a:\n" + "  [\n" * 3000 + "  " + "]" * 3000 + "\n"),
        # All on one line, as minified JSON is: 500 levels, past the ~330 that Python's
        # recursion limit lets the composer reach. (ruamel.yaml's scanner keeps a possible
        # simple key for each flow collection opened in the last 1024 characters of a line and
        # re-checks them all at every token: 3000 levels on one line took seconds to refuse.)
        ("deep-line.yaml", "a: " + "[" * 500 + "]" * 500 + "\n"),
    ):
        deep = tmp_path / name
        deep.write_text(text)
        result = CliRunner().invoke(app, ["lint", str(deep)])
        assert result.exit_code == 2 and "nested too deep" in result.output, name
        wrap = CliRunner().invoke(app, ["wrap", str(deep), "--budget-usd", "5"])
        assert wrap.exit_code == 2 and "nested too deep" in wrap.output, name


@pytest.mark.parametrize("budget", ["NaN", "-5", "Infinity", "1e999999999"])
def test_lint_diff_budget_is_checked(budget: str) -> None:
    result = CliRunner().invoke(
        app, ["lint", str(REVIEW2 / "onerror.yaml"), "--diff", "--budget-usd", budget]
    )
    assert result.exit_code == 2 and "--budget-usd" in result.output


def billion_laughs(levels: int = 9) -> list[str]:
    """Each level an anchor aliasing the one before nine times: 9**levels "lol"s in ~600 bytes."""
    return ["lol0: &lol0 lol"] + [
        f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]" for i in range(1, levels + 1)
    ]


WORKFLOW_HEAD = """apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: lol-}
spec:
  entrypoint: main
  templates:
  - name: main
"""
STRIPE_ENV = """      env:
      - name: STRIPE_SECRET_KEY
        valueFrom: {secretKeyRef: {name: stripe-credentials, key: secret_key}}
"""


def peak_mib(run: Callable[[], Any]) -> tuple[Any, float]:
    tracemalloc.start()
    try:
        return run(), tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_a_billion_laughs_file_is_refused_before_its_aliases_are_expanded(tmp_path: Path) -> None:
    # Without the bound, lint would write out all 10**9 "lol"s of `args` (a version with 9**8
    # took 760 MiB): so the bound is checked first where both commands load a file, which is
    # cheap even without it (loading shares an anchor's nodes; walking them expands them).
    from keybrake.adopt.workflows import load_documents
    from keybrake.adopt.yaml_bound import ALIAS_NODE_LIMIT, TooManyAliasNodes

    bomb = tmp_path / "lol.yaml"
    bomb.write_text(
        "\n".join(billion_laughs())
        + "\n"
        + WORKFLOW_HEAD
        + "    container:\n      image: x\n      args: *lol9\n"
        + STRIPE_ENV
    )
    assert bomb.stat().st_size < 1024
    with pytest.raises(TooManyAliasNodes):
        load_documents(bomb.read_text())
    limit = f"{ALIAS_NODE_LIMIT:,}"
    for args in (["lint", str(bomb)], ["wrap", str(bomb), "--budget-usd", "5"]):
        result, peak = peak_mib(lambda args=args: CliRunner().invoke(app, args))
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output
        assert str(bomb) in result.output and "aliases expand to more than" in result.output
        assert limit in result.output and "(line 8)" in result.output  # level 7 goes past it
        assert peak < 32, f"{args[0]}: {peak:.1f} MiB"  # expanded, 10**9 nodes are gigabytes
    # So is a settings file (read with PyYAML: bounded the same way).
    config = tmp_path / "lol-config.yaml"
    config.write_text("\n".join(billion_laughs()) + "\ninternal_secrets: *lol9\n")
    result = CliRunner().invoke(app, ["lint", "--config", str(config), str(EDGE / "wrap")])
    assert result.exit_code == 2 and f"{config}: not a readable YAML file" in result.output
    assert limit in result.output
    # Among other files, it is the one named; the others are still linted.
    report = lint_paths([bomb, EDGE / "wrap" / "anchors.yaml"])
    assert [u.path for u in report.unreadable] == [bomb] and report.findings


def test_alias_expansion_is_counted_as_the_nodes_it_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keybrake.adopt import yaml_bound
    from keybrake.adopt.workflows import load_documents

    # `&a` is 4 nodes (the list and its 3 items); `&b` holds 2 of them: 1 + 8 nodes.
    text = "a: &a [1, 2, 3]\nb: &b [*a, *a]\nc: *b\n"  # the aliases copy 4 + 4 + 9 nodes
    monkeypatch.setattr(yaml_bound, "ALIAS_NODE_LIMIT", 17)
    assert load_documents(text)[0]["c"] == [[1, 2, 3], [1, 2, 3]]
    monkeypatch.setattr(yaml_bound, "ALIAS_NODE_LIMIT", 16)
    with pytest.raises(yaml_bound.TooManyAliasNodes, match=r"more than 16 nodes \(line 3\)"):
        load_documents(text)
    # The limit is the file's: documents add up (each with its own anchors).
    monkeypatch.setattr(yaml_bound, "ALIAS_NODE_LIMIT", 12)
    assert len(load_documents("a: &a [1, 2, 3]\nb: [*a, *a]\n")) == 1
    with pytest.raises(yaml_bound.TooManyAliasNodes, match=r"\(line 5\)"):  # 8 + 8 nodes
        load_documents("a: &a [1, 2, 3]\nb: [*a, *a]\n---\na: &a [1, 2, 3]\nb: [*a, *a]\n")
    # An alias inside the node it names (a recursive structure) is one node: never expanded.
    monkeypatch.setattr(yaml_bound, "ALIAS_NODE_LIMIT", 1)
    assert len(load_documents("a: &a [x, *a]\n")) == 1


def test_ordinary_anchors_lint_and_wrap_as_if_written_out(tmp_path: Path) -> None:
    """Shared env, retries, labels merged with `<<`: the same findings and the same wrapped
    workflow as the file with every alias written out (as JSON, which has none)."""
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text(
        """apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata:
  generateName: charges-
  labels: &labels {team: billing, app: charges}
spec:
  entrypoint: main
  podMetadata:
    labels: *labels
  templates:
  - name: main
    steps:
    - - name: charge
        template: charge
        arguments: &per_customer
          parameters: [{name: customer, value: "{{item}}"}]
        withItems: &customers [cus_a, cus_b, cus_c]
      - name: refund
        template: refund
        arguments: *per_customer
        withItems: *customers
  - name: charge
    inputs: &inputs
      parameters: [{name: customer}]
    retryStrategy: &retry
      limit: 3
      retryPolicy: Always
    container:
      image: &image ghcr.io/acme/billing:1.4
      command: [python, charge.py]
      resources: &resources
        requests: {cpu: 100m, memory: 128Mi}
      env: &stripe_env
      - name: STRIPE_SECRET_KEY
        valueFrom:
          secretKeyRef: {name: stripe-credentials, key: secret_key}
      - name: LOG_LEVEL
        value: info
  - name: refund
    inputs: *inputs
    retryStrategy: *retry
    container:
      image: *image
      command: [python, refund.py]
      resources: *resources
      env: *stripe_env
  - name: report
    metadata:
      labels:
        <<: *labels
        step: report
    container:
      image: *image
      command: [python, report.py]
"""
    )
    safe = YAML(typ="safe")
    written_out = tmp_path / "written_out.yaml"
    written_out.write_text(json.dumps(safe.load(anchored.read_text()), indent=2))

    def findings(path: Path) -> list[tuple[str, str, str | None, str]]:
        report = lint_paths([path])
        assert not report.unreadable
        return sorted((f.rule, f.severity, f.template, f.message) for f in report.findings)

    assert findings(anchored) == findings(written_out)
    assert ("KB101", "high", "refund") in {f[:3] for f in findings(anchored)}
    wrapped_anchored = wrap_text(anchored.read_text(), OPTIONS)
    wrapped_out = wrap_text(written_out.read_text(), OPTIONS)
    assert safe.load(wrapped_anchored.text) == safe.load(wrapped_out.text)
    assert wrapped_anchored.notes == wrapped_out.notes and wrapped_anchored.vendors == ["stripe"]
    assert "env: &stripe_env" in wrapped_anchored.text  # the file's anchors are kept
    for args in (["lint", str(anchored)], ["wrap", str(anchored), "--budget-usd", "5"]):
        assert CliRunner().invoke(app, args).exit_code == (1 if args[0] == "lint" else 0)


def test_an_alias_bomb_in_a_pod_spec_patch_adds_nothing(tmp_path: Path) -> None:
    """A podSpecPatch is YAML in a string, read later: bounded the same way. Like a patch that
    is no YAML, a bomb is no patch Argo applies: the rest of the template is still linted."""
    from keybrake.adopt.yaml_bound import ALIAS_NODE_LIMIT, TooManyAliasNodes, safe_load

    # 9**7 nodes: past the limit, yet only ~90 MiB written out should the bound be bypassed.
    patch = [
        *billion_laughs(7),
        "containers: [{name: main, env: [{name: X_TOKEN,",
        "  valueFrom: {secretKeyRef: {name: *lol7, key: token}}}]}]",
    ]
    text = (
        WORKFLOW_HEAD
        + "    podSpecPatch: |\n"
        + "".join(f"      {line}\n" for line in patch)
        + "    container:\n      image: x\n"
        + STRIPE_ENV
    )
    with pytest.raises(TooManyAliasNodes, match=f"more than {ALIAS_NODE_LIMIT:,}"):
        safe_load("\n".join(patch))
    path = tmp_path / "psp.yaml"
    path.write_text(text)
    report, peak = peak_mib(lambda: lint_paths([path]))
    assert not report.unreadable and peak < 32, f"{peak:.1f} MiB"
    (kb101,) = [f for f in report.findings if f.rule == "KB101"]
    assert "STRIPE_SECRET_KEY (env, main container)" in kb101.message
