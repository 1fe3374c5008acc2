"""Vendor facts are stated once, in `keybrake.proxy.vendor_facts`: the proxy, `keybrake wrap`
(`keybrake.adopt`) and the Hera library read them there. Two kinds of check: what each reader
exposes equals the facts, and no source of the packages spells a fact again (a variable a
workload's SDK reads, a proxy setting's variable, an upstream, Twilio's placeholder SID, or a
list of the vendors), the step scripts embedded in templates/ included."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from keybrake.adopt import credentials as adopt_credentials
from keybrake.adopt import wrap as adopt_wrap
from keybrake.cli.wrap import WrapVendor
from keybrake.hera_workflows import vendors as hera_vendors
from keybrake.hera_workflows.issue import issue_template
from keybrake.hera_workflows.published import fanout
from keybrake.hera_workflows.render import GENERATED_HEADER
from keybrake.hera_workflows.step_pod import step_source
from keybrake.hera_workflows.vendors import VendorSdk
from keybrake.proxy.pricing import load_pricing
from keybrake.proxy.settings import Settings, VendorCredentials
from keybrake.proxy.vendor_facts import (
    TWILIO,
    TWILIO_API_VERSION,
    TWILIO_PLACEHOLDER_SID,
    VENDOR_FACTS,
    VENDOR_NAMES,
    setting_variable,
)
from keybrake.proxy.vendors import VENDORS
from keybrake.proxy.vendors import twilio as proxy_twilio

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "hera_workflows", "adopt", "reaper")
FACTS_FILE = ROOT / "proxy" / "vendor_facts.py"
VALIDATORS = {name: cls.validate_pricing for name, cls in VENDORS.items()}


# --- every reader equals the facts ------------------------------------------------------------


def test_the_proxy_serves_the_vendors_of_the_facts_in_their_order() -> None:
    assert tuple(VENDORS) == VENDOR_NAMES
    assert all(cls.name == name for name, cls in VENDORS.items())
    assert proxy_twilio.PLACEHOLDER_SID == TWILIO_PLACEHOLDER_SID
    assert proxy_twilio.API_VERSION == TWILIO_API_VERSION


def test_each_vendor_setting_is_a_setting_read_from_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings.model_config["env_prefix"] == "KEYBRAKE_"  # what setting_variable spells
    for vendor in VENDOR_FACTS.values():
        for setting in vendor.settings.names:
            assert setting in Settings.model_fields, setting
        upstream = Settings.model_fields[vendor.settings.upstream]
        assert upstream.default == vendor.settings.default_upstream
    for variable in [n for n in os.environ if n.startswith("KEYBRAKE_")]:
        monkeypatch.delenv(variable)
    for vendor in VENDOR_FACTS.values():
        names = vendor.settings
        monkeypatch.setenv(setting_variable(names.credential), f"secret-{vendor.name}")
        monkeypatch.setenv(setting_variable(names.upstream), f"http://{vendor.name}.test")
        if names.account:
            monkeypatch.setenv(setting_variable(names.account), f"account-{vendor.name}")
    found = Settings().vendor_credentials()
    assert list(found) == list(VENDOR_NAMES)
    for name, creds in found.items():
        assert (creds.base_url, creds.secret) == (f"http://{name}.test", f"secret-{name}")
        assert creds.account == (f"account-{name}" if VENDOR_FACTS[name].settings.account else None)
    # A vendor whose secret needs an account is not reachable without it.
    monkeypatch.delenv(setting_variable(TWILIO.settings.account))
    assert TWILIO.name not in Settings().vendor_credentials()


def test_the_twilio_module_names_the_account_setting_of_the_facts() -> None:
    no_account = VendorCredentials("http://x.test", "token")
    with pytest.raises(ValueError, match=setting_variable(TWILIO.settings.account)):
        VENDORS[TWILIO.name](no_account, load_pricing(None, VALIDATORS))


def test_each_usual_endpoint_is_priced_in_the_default_table() -> None:
    """A key issued for the usual call (wrap's default, keybrake-fanout's) can make it."""
    pricing = load_pricing(None, VALIDATORS)
    for vendor in VENDOR_FACTS.values():
        creds = VendorCredentials("http://x.test", "s", account="AC" + "1" * 32)
        proxied = VENDORS[vendor.name](creds, pricing)
        for endpoint in vendor.usual_endpoints:
            method, _, path = endpoint.partition(" ")
            sample = path.replace("*", TWILIO_PLACEHOLDER_SID)
            assert proxied.rule_for(method, sample) not in (None, "free"), endpoint


def test_the_hera_library_reads_the_facts() -> None:
    assert hera_vendors.VENDORS == {
        v.name: VendorSdk(v.name, v.sdk.key, v.sdk.base_url, v.sdk.fixed)
        for v in VENDOR_FACTS.values()
    }
    assert hera_vendors.TWILIO_PLACEHOLDER_SID == TWILIO_PLACEHOLDER_SID
    published = fanout().to_dict()["spec"]["arguments"]["parameters"]
    by_name = {p["name"]: p for p in published}
    assert by_name["vendor"]["enum"] == list(VENDOR_NAMES)
    default = VENDOR_FACTS[by_name["vendor"]["value"]]
    assert json.loads(by_name["allowed_endpoints"]["value"]) == list(default.usual_endpoints)
    inputs = {p.name: p for p in issue_template().inputs.parameters}
    assert all(name in str(inputs["vendor"].description) for name in VENDOR_NAMES)


def test_wrap_and_lint_read_the_facts() -> None:
    assert adopt_wrap.SUPPORTED == VENDOR_NAMES
    assert adopt_wrap.DEFAULT_ENDPOINTS == {
        v.name: list(v.usual_endpoints) for v in VENDOR_FACTS.values()
    }
    assert adopt_wrap.BASE_URL_VARIABLE == {v.name: v.sdk.base_url for v in VENDOR_FACTS.values()}
    assert list(adopt_wrap.CODE_CHANGES) == list(VENDOR_NAMES)
    for name, change in adopt_wrap.CODE_CHANGES.items():
        assert VENDOR_FACTS[name].sdk.base_url in change
    proxied = list(adopt_credentials.VENDORS)[: len(VENDOR_NAMES)]
    assert proxied == list(VENDOR_NAMES)
    assert [v.value for v in WrapVendor] == ["auto", *VENDOR_NAMES]


def test_the_facts_cost_the_standard_library_only() -> None:
    """The Hera library and `keybrake wrap` read them without loading the proxy's request path
    (nor the vendor modules, pricing and settings of `keybrake.proxy.vendors`)."""
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import keybrake.proxy.vendor_facts\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    ours = {m for m in loaded if m.partition(".")[0] == "keybrake"}
    assert ours == {"keybrake", "keybrake.proxy", "keybrake.proxy.vendor_facts"}, ours
    others = {m.partition(".")[0] for m in loaded - ours}
    assert others <= set(sys.stdlib_module_names), others


# --- no source spells a fact again --------------------------------------------------------------


def restated_strings() -> dict[str, str]:
    """Each string that is a fact only the facts module may spell, and what it is."""
    found: dict[str, str] = {TWILIO_PLACEHOLDER_SID: "Twilio's placeholder SID"}
    for v in VENDOR_FACTS.values():
        found[v.sdk.key] = f"{v.name}'s SDK key variable"
        found[v.sdk.base_url] = f"{v.name}'s SDK base-URL variable"
        found[v.settings.default_upstream] = f"{v.name}'s upstream"
        for name, _ in v.sdk.fixed:
            found[name] = f"{v.name}'s SDK variable"
        for setting in v.settings.names:
            found[setting_variable(setting)] = f"the proxy setting {setting}"
    return found


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes: prose may name a variable, code may not."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def constant(node: ast.AST) -> Any:
    """The value of a constant expression (`"AC" + "0" * 32` too); None for anything else."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
        left, right = constant(node.left), constant(node.right)
        if left is None or right is None:
            return None
        try:
            return left + right if isinstance(node.op, ast.Add) else left * right
        except TypeError:
            return None
    return None


def restatements(source: str, where: str) -> Iterator[str]:
    """Where `source` spells a fact in code: a fact inside a string (docstrings are prose), a
    list, set or dict of two or more vendor names, or a string naming two or more vendors ("stripe,
    twilio or resend"). A single vendor named as an example is no list of them."""
    tree = ast.parse(source)
    prose = docstrings(tree)
    facts = restated_strings()
    vendors = set(VENDOR_NAMES)
    for node in ast.walk(tree):
        value = constant(node)
        if isinstance(value, str) and id(node) not in prose:
            for fact, what in facts.items():
                if fact in value:
                    yield f"{where}:{node.lineno}: {what} {fact!r}"
            named = {n for n in vendors if re.search(rf"\b{n}\b", value, re.IGNORECASE)}
            if len(named) > 1:
                yield f"{where}:{node.lineno}: a string naming the vendors {sorted(named)}"
        items: list[ast.expr | None] = []
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            items = list(node.elts)
        elif isinstance(node, ast.Dict):
            items = list(node.keys)
        listed = {constant(item) for item in items if item is not None} & vendors
        if len(listed) > 1:
            yield f"{where}:{node.lineno}: a list of vendors {sorted(listed)}"


def package_sources() -> Iterator[tuple[str, str]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != FACTS_FILE:
                yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def test_no_source_restates_a_vendor_fact() -> None:
    sources = list(package_sources())
    assert len(sources) > 20  # the scan reads the packages: an empty glob cannot pass it
    found = [line for where, source in sources for line in restatements(source, where)]
    assert not found, "read these from keybrake.proxy.vendor_facts:\n" + "\n".join(found)


def test_the_step_scripts_in_templates_restate_no_fact() -> None:
    """The step scripts run on a stock Python image and import nothing of keybrake, and none
    needs a vendor fact: so none may spell one. Checked in the committed templates/ (what
    `keybrake templates render --check` holds equal to the renderer's output), every source."""
    sources = {}
    for path in sorted((ROOT / "templates").rglob("*.yaml")):
        if path.read_text(encoding="utf-8").startswith(GENERATED_HEADER):
            for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                for template in document["spec"]["templates"]:
                    if "script" in template:
                        where = f"{path.relative_to(ROOT)} {template['name']}"
                        sources[where] = template["script"]["source"]
    assert {step_source("issue"), step_source("revoke")} == set(sources.values())
    for where, source in sources.items():
        assert list(restatements(source, where)) == []


@pytest.mark.parametrize(
    "source",
    [
        'VENDORS = ("stripe", "twilio")',
        'URLS = {"stripe": 1, "resend": 2}',
        'SID = "AC" + "0" * 32',
        'env = "STRIPE_BASE_URL"',
        'hint = f"set KEYBRAKE_RESEND_API_KEY={1}"',
        'BASE = "https://api.twilio.com"',
        'HELP = "stripe, twilio or resend"',
    ],
)
def test_the_check_sees_a_restated_fact(source: str) -> None:
    assert list(restatements(source, "x.py"))


def test_the_check_leaves_prose_and_a_single_example_alone() -> None:
    source = (
        '"""Reads STRIPE_BASE_URL."""\n\ndef f():\n    """e.g. stripe"""\n    return "stripe"\n'
    )
    assert list(restatements(source, "x.py")) == []
