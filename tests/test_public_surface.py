"""Each package's public surface, pinned, and the one exception tree (httpx's
tests/test_exported_members.py, in this project's manner).

- `PUBLIC` pins the `__all__` of every public module (no part of its name starts with `_`) that
  has one, and of every package; a package pinned `None` re-exports nothing: its surface is its
  modules. A new public name, or a new module with an `__all__`, fails here until it is pinned:
  making something public is a decision.
- Every name any `__all__` lists exists, and every `keybrake.…` name the README and docs/ show
  imports.
- Every exception class of `keybrake.proxy` is defined in `keybrake.proxy.errors` and derives
  from `KeybrakeError`, and every one of the other packages derives from it too, except the
  control-flow signals listed in `OUTSIDE_THE_TREE`, each with why.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

from keybrake.proxy import errors

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "keybrake.proxy",
    "keybrake.cli",
    "keybrake.hera_workflows",
    "keybrake.adopt",
    "keybrake.reaper",
)

PUBLIC: dict[str, str | None] = {
    # keybrake.proxy
    "keybrake.proxy": None,
    "keybrake.proxy.access": """ISSUER_TOKEN_PREFIX Actor Authenticator Forbidden Identity
        LoginRefused Policy TokenVerifier admin_only check_accounts check_budget check_key
        check_label check_patch check_scope hash_token hash_vault_key looks_like_jwt namespace_of
        policy_json refused_login""",
    "keybrake.proxy.admin": "AdminApi error",
    "keybrake.proxy.alerts": "CAP_HIT Alerts Sender crossings",
    "keybrake.proxy.app": "build_app maintain utc_now",
    "keybrake.proxy.asgi": "create_app",
    "keybrake.proxy.body": "BodyDeadlines",
    "keybrake.proxy.client": "DEFAULT_URL KeybrakeClient",
    "keybrake.proxy.decisions": """BUCKET CAP_HITS CUT_OFF RATE_NOTE RATE_SECONDS RULE_VERSION
        WINDOW Admitted Caps Decision Prior Rate admit bucket_of bucket_start bucket_start_second
        caller_of dead_reason dedupe_token is_cap_hit item_of offset_cost over_rate rate_floor
        refusal refusal_status report_note second_of settle_amounts window_floor""",
    "keybrake.proxy.endpoints": "EndpointPattern allows compile_patterns safe_path",
    "keybrake.proxy.errors": """AccessError AmbiguousRequest ApiError ClientError ConfigError
        Conflict CursorError EstimateError Forbidden IdempotencyMismatch InvalidRequest
        KeybrakeError LoginRefused LookupFailed NotFound PricingEntryError ProxyUnreachable
        RulesNewer SchemaNewer StoreUnavailable Unchecked Unpriceable Unreadable UpstreamError
        VaultError""",
    "keybrake.proxy.kubernetes": """LEEWAY REFETCH_AFTER ApiServer JwksVerifier
        TokenReviewVerifier verifier_from""",
    "keybrake.proxy.constraints": """FIELDS RATE VENDOR_FIELDS Constraints Found Unchecked
        Unreadable Violation canonical_domain canonical_number canonical_service collect
        email_address parse_constraints twilio_address""",
    "keybrake.proxy.metrics": "NAMES Metrics",
    "keybrake.proxy.models": """AuditPage AuditRow BudgetCreate BudgetInfo BudgetList CapsPatch
        ChangeInfo EventInfo EventPage IssuedIssuer IssuedKey IssuerCreate IssuerDelete IssuerInfo
        IssuerList KeyCreate KeyInfo KeyList KubernetesBinding LabelRevoke PruneRequest
        PruneResult RevokeResult describe_validation_error""",
    "keybrake.proxy.money": """MAX_DURATION MICROS_PER_USD format_ts format_usd micros_to_usd
        parse_duration parse_ts usd_to_micros""",
    "keybrake.proxy.paging": "CursorError decode_id decode_position encode_id encode_position",
    "keybrake.proxy.pipeline": """CAP_HIT_HEADER CODE_HEADER RATE_LIMITED_HEADER Incoming
        LookupFailed Pipeline Reply hash_vault_key""",
    "keybrake.proxy.pricing": """AmbiguousRequest PricingEntryError PricingTable Unpriceable
        load_pricing""",
    "keybrake.proxy.redact": "RedactingFilter redact",
    "keybrake.proxy.settings": "Settings VendorCredentials read_settings_file unknown_variables",
    "keybrake.proxy.strict_json": "parse_json",
    "keybrake.proxy.tls": "ReloadingCertificate TLSConfig",
    "keybrake.proxy.upstream": "HOP_BY_HOP Upstream UpstreamError UpstreamResponse",
    "keybrake.proxy.vault": "MAX_LIST_LIMIT Issued Vault",
    "keybrake.proxy.vendor_facts": """RESEND STRIPE TWILIO TWILIO_API_VERSION TWILIO_PLACEHOLDER_SID
        VENDOR_FACTS VENDOR_NAMES ProxySettings SdkVariables VendorFacts setting_variable""",
    "keybrake.proxy.views": "alert_info audit_row budget_info event_info issuer_info key_info",
    "keybrake.proxy.store": "Store open_store sqlite_path",
    "keybrake.proxy.store.operations": """AUDIT_COLUMNS INSERT_AUDIT SQLStore audit_values
        insert_audit""",
    "keybrake.proxy.store.postgres": "MIGRATIONS PostgresStore ledger_sql migrate_connection",
    "keybrake.proxy.store.protocol": "Store",
    "keybrake.proxy.store.records": """ACTIVITY_POINTS NEAR_CAP Admission AlertDelivery AlertLevel
        AuditFilter AuditRecord BudgetRecord BudgetView Change Event EventFilter IssueRequest
        Issued IssuerRecord KeyRecord KeyView Listing MetricsSnapshot Owner Patch Reservation
        RunActivity
        RunFilter RunRow Scope Session Settlement StoredResponse Usage activity_width bucket_time
        key_status merge_runs percents_of percents_text revoked_event shown subject_table""",
    "keybrake.proxy.store.sql": """CAP_HIT_SQL POSTGRES SQLITE Dialect Op Query Refused Where
        compiled execute execute_many inserted_id moment row rows run_async run_sync value""",
    "keybrake.proxy.store.sqlite": "MIGRATIONS SQLiteStore",
    "keybrake.proxy.store.sqlite_ledger": "compact_spend reserve settle sweep",
    "keybrake.proxy.ui": None,
    "keybrake.proxy.ui.charts": "Bar Chart Dot bars hits_chart spend_chart usd",
    "keybrake.proxy.ui.dashboard": "COOKIE Dashboard",
    "keybrake.proxy.ui.runs": "Point RunSummary Series cumulative summarise summary_of",
    "keybrake.proxy.vendors": "VENDORS Vendor",
    "keybrake.proxy.vendors.base": """FREE Cost Lookup Unpriceable Vendor VendorCall default_settle
        rule_parts""",
    "keybrake.proxy.vendors.bodies": "FormBody parse_json read_form read_json",
    "keybrake.proxy.vendors.resend": "Resend",
    "keybrake.proxy.vendors.sms": "GSM7_BASIC GSM7_EXTENSION Segments sms_segments",
    "keybrake.proxy.vendors.stripe": "Stripe",
    "keybrake.proxy.vendors.twilio": "PLACEHOLDER_SID Twilio",
    "keybrake.proxy.vendors.unit_prices": """flat_rule parse_price unpriced validate_endpoints
        validate_price_table validate_section""",
    # keybrake.cli: its commands are typer apps, run through `keybrake.cli.main`
    "keybrake.cli": None,
    "keybrake.cli.templates": "app",
    # keybrake.hera_workflows
    "keybrake.hera_workflows": """BUDGET_ID_GLOBAL DEFAULT_PROXY_URL EXIT_REFUSED ITEM KEY_ID_GLOBAL
        RETRY_EXPRESSION SPEND_SUMMARY_GLOBAL VENDORS ProxyConnection RunBudget SharedTemplates
        TemplateConfigError VaultKey budget_template default_retry_strategy fan_out issue_budget
        issue_template issue_vault_key revoke_on_exit revoke_template""",
    "keybrake.hera_workflows.budget": """BUDGET_ID_GLOBAL BUDGET_TASK BUDGET_TEMPLATE RunBudget
        budget_template issue_budget""",
    "keybrake.hera_workflows.connection": """ADMIN_TOKEN_ENV CA_BUNDLE DEFAULT_CLUSTER
        DEFAULT_PROXY_URL DEFAULT_SECRET_KEY DEFAULT_SECRET_NAME ISSUER_SERVICE_ACCOUNT STEP_IMAGE
        TOKEN_FILE ProxyConnection is_expression""",
    "keybrake.hera_workflows.errors": "TemplateConfigError",
    "keybrake.hera_workflows.examples": None,
    "keybrake.hera_workflows.fanout": "ITEM ITEM_ID ItemValue fan_out",
    "keybrake.hera_workflows.issue": """ISSUE_TASK ISSUE_TEMPLATE KEY_ID_GLOBAL RUN_LABEL VaultKey
        issue_template issue_vault_key""",
    "keybrake.hera_workflows.keybrake_pod": """AGAIN CAP_HIT EXIT_REFUSED OK PROXY_ERROR
        RATE_LIMITED REFUSED VENDOR_ERROR Answer Caller Refused call classify classify_error
        retry_after_seconds watch""",
    "keybrake.hera_workflows.published": """FANOUT_PARALLELISM FANOUT_TEMPLATE VAULT_KEY_TEMPLATE
        fanout vault_key""",
    "keybrake.hera_workflows.render": """GENERATED_HEADER Comparison RenderedFile compare dump_yaml
        ordered rendered_files write""",
    "keybrake.hera_workflows.retry": """EXIT_REFUSED EXIT_UNAVAILABLE RETRY_EXPRESSION
        default_retry_strategy exit_handler_retry_strategy""",
    "keybrake.hera_workflows.revoke": """REVOKE_TEMPLATE SPEND_SUMMARY_GLOBAL revoke_on_exit
        revoke_template""",
    "keybrake.hera_workflows.shared_templates": "VAULT_KEY_TEMPLATE SharedTemplates",
    "keybrake.hera_workflows.step_pod": "OUTPUT_DIR STEP_IMAGE script_step step_source",
    "keybrake.hera_workflows.vendors": """TWILIO_PLACEHOLDER_SID VENDORS VendorSdk check_vendor
        sdk_env""",
    "keybrake.hera_workflows.workflow_context": "add_template current_dag current_workflow",
    # keybrake.adopt
    "keybrake.adopt": None,
    "keybrake.adopt.credentials": "VENDORS CredentialUse Heuristic credential_uses",
    "keybrake.adopt.lint": "DEFAULT_SEVERITY RULES SEVERITIES Finding Report Rule lint_paths",
    "keybrake.adopt.report": "as_json as_sarif as_text",
    "keybrake.adopt.workflows": """KINDS Document FanOut Skipped Unreadable Workflow line_of
        load_documents load_paths yaml_round_trip""",
    "keybrake.adopt.wrap": "CODE_CHANGES DEFAULT_ENDPOINTS WrapError WrapOptions Wrapped wrap_text",
    "keybrake.adopt.yaml_bound": """ALIAS_NODE_LIMIT AliasExpansion BoundedComposer
        TooManyAliasNodes safe_load""",
    # keybrake.reaper
    "keybrake.reaper": "FINAL_PHASES LiveSubject Reaper Revocation Run RunBook verdict",
    "keybrake.reaper.reaper": "Reaper Revocation",
    "keybrake.reaper.runs": "FINAL_PHASES LiveSubject Run RunBook verdict",
    "keybrake.reaper.watch": "WatchGone Workflow WorkflowWatch",
}

# Moved into keybrake.proxy.errors, and still importable from where they were defined before.
MOVED = {
    "keybrake.proxy.access": ("Forbidden", "LoginRefused"),
    "keybrake.proxy.paging": ("CursorError",),
    "keybrake.proxy.pipeline": ("LookupFailed",),
    "keybrake.proxy.pricing": ("AmbiguousRequest", "PricingEntryError", "Unpriceable"),
    "keybrake.proxy.upstream": ("UpstreamError",),
}

# Callers catch these as ValueError (pricing's loader, parsers of query strings, users of the
# Hera building blocks), as they did before they joined the tree.
VALUE_ERRORS = (
    "keybrake.proxy.errors:CursorError",
    "keybrake.proxy.errors:PricingEntryError",
    "keybrake.hera_workflows.errors:TemplateConfigError",
)

# Exceptions that are not errors anybody outside their module sees: signals from where a decision
# is made to where it is acted on, caught in the same module (or package) before they could
# escape. Everything else raised on purpose is a `KeybrakeError`.
OUTSIDE_THE_TREE = {
    "keybrake.proxy.pipeline._Refused": (
        "a stage's refusal before the reservation; `Pipeline.handle` turns it into the reply "
        "and the audit row, so it never leaves the pipeline"
    ),
    "keybrake.proxy.pipeline._PolicyChanged": (
        "the ledger's word that a call was judged against older constraints; `Pipeline` judges "
        "the call again (or refuses it), so it never leaves the pipeline"
    ),
    "keybrake.proxy.store.sql.Refused": (
        "a write operation's signal to roll its transaction back and answer `result` instead; "
        "caught by the backends (sqlite.py, postgres.py), it never leaves the store"
    ),
    "keybrake.proxy.ui.dashboard._FormError": (
        "a form the dashboard cannot read; caught by the page that read it and shown on it"
    ),
    "keybrake.hera_workflows.keybrake_pod.Refused": (
        "raised in a pod, whose image has no keybrake: the pod helper is one standard-library "
        "file, copied, that imports nothing of keybrake (see its docstring)"
    ),
    "keybrake.reaper.watch.WatchGone": (
        "410 Gone from the watch, telling `WorkflowWatch.run` to list again; never leaves run()"
    ),
}


def _private(name: str) -> bool:
    return any(part.startswith("_") for part in name.split("."))


def _modules(root: str) -> list[ModuleType]:
    """`root` and every module under it, imported; not `__main__` (it runs the CLI) nor the
    Hera steps' `_step_*.py` (standard-library scripts that run in pods, outside any tree)."""
    package = importlib.import_module(root)
    names = [root]
    for found in pkgutil.walk_packages(package.__path__, f"{root}."):
        last = found.name.rsplit(".", 1)[-1]
        if last != "__main__" and not last.startswith("_step_"):
            names.append(found.name)
    return [importlib.import_module(name) for name in names]


ALL_MODULES = [module for root in PACKAGES for module in _modules(root)]


def _own_names(module: ModuleType) -> list[str]:
    """The public names a module without `__all__` defines: not its submodules, not
    `from __future__ import annotations`."""
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, ModuleType)
        and type(value).__module__ != "__future__"
    ]


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_are_pinned(name: str) -> None:
    module = importlib.import_module(name)
    pinned = PUBLIC[name]
    if pinned is None:
        assert not hasattr(module, "__all__"), f"{name} has an __all__: pin it here"
        assert _own_names(module) == [], f"{name} defines public names: give it an __all__"
        return
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    assert sorted(exported) == sorted(pinned.split())


def test_every_public_module_with_all_is_pinned() -> None:
    unpinned = [
        module.__name__
        for module in ALL_MODULES
        if not _private(module.__name__)
        and (hasattr(module, "__all__") or hasattr(module, "__path__"))
        and module.__name__ not in PUBLIC
    ]
    assert unpinned == [], "new public modules: pin their __all__ in PUBLIC"


@pytest.mark.parametrize("module", ALL_MODULES, ids=lambda module: module.__name__)
def test_every_exported_name_exists(module: ModuleType) -> None:
    missing = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
    assert missing == []


# -- what the README and docs/ show ---------------------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FROM_IMPORT = re.compile(r"^\s*from\s+(keybrake(?:\.\w+)+)\s+import\s+(\([^)]*\)|[^\n]+)", re.M)
_DOTTED = re.compile(r"\bkeybrake\.(?:proxy|cli|hera_workflows|adopt|reaper)(?:\.\w+)*(?::\w+)?")
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _documented() -> list[str]:
    """Every `keybrake.…` name the docs show: what a Python block imports (`module:name`), and
    every dotted name anywhere (`keybrake.proxy.asgi:create_app`, `keybrake.cli.main`)."""
    found: set[str] = set()
    for doc in DOCS:
        text = doc.read_text()
        for block in _PYTHON_BLOCK.findall(text):
            for module, names in _FROM_IMPORT.findall(block):
                for imported in names.strip("()").split(","):
                    if imported.strip():
                        found.add(f"{module}:{imported.split(' as ')[0].strip()}")
        found.update(_DOTTED.findall(text))
    return sorted(found)


def _resolve(reference: str) -> object:
    """`package.module:name`, or a dotted name whose longest importable prefix is a module."""
    path, _, attribute = reference.partition(":")
    parts = path.split(".")
    for cut in range(len(parts), 1, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in [*parts[cut:], *([attribute] if attribute else [])]:
            found = getattr(found, name)
        return found
    raise ModuleNotFoundError(reference)


def test_docs_show_names() -> None:
    assert "keybrake.hera_workflows:issue_vault_key" in _documented()


@pytest.mark.parametrize("reference", _documented())
def test_documented_names_import(reference: str) -> None:
    _resolve(reference)


# -- the one exception tree -----------------------------------------------------------------------


def _exceptions(modules: list[ModuleType]) -> dict[str, type[BaseException]]:
    """Every exception class defined (not imported) in `modules`, by its qualified name."""
    return {
        f"{module.__name__}.{cls.__qualname__}": cls
        for module in modules
        for cls in vars(module).values()
        if inspect.isclass(cls)
        and issubclass(cls, BaseException)
        and cls.__module__ == module.__name__
    }


PROXY_EXCEPTIONS = _exceptions(_modules("keybrake.proxy"))
OTHER_EXCEPTIONS = _exceptions([m for root in PACKAGES[1:] for m in _modules(root)])


def test_every_proxy_exception_is_in_the_tree() -> None:
    """Defined in keybrake.proxy.errors and a KeybrakeError, or a listed control-flow signal."""
    astray = sorted(
        name
        for name, cls in PROXY_EXCEPTIONS.items()
        if name not in OUTSIDE_THE_TREE
        and not (cls.__module__ == errors.__name__ and issubclass(cls, errors.KeybrakeError))
    )
    assert astray == [], "move these into keybrake.proxy.errors (or list them, with why)"


def test_the_other_packages_raise_keybrake_errors() -> None:
    astray = sorted(
        name
        for name, cls in OTHER_EXCEPTIONS.items()
        if name not in OUTSIDE_THE_TREE and not issubclass(cls, errors.KeybrakeError)
    )
    assert astray == [], "derive these from keybrake.proxy.errors.KeybrakeError (or list them)"


def test_signals_outside_the_tree_still_exist() -> None:
    defined = PROXY_EXCEPTIONS.keys() | OTHER_EXCEPTIONS.keys()
    assert sorted(OUTSIDE_THE_TREE.keys() - defined) == [], "gone: take them off the list"
    for name, reason in OUTSIDE_THE_TREE.items():
        assert reason.strip(), name


def test_errors_lists_the_whole_tree() -> None:
    """errors.py's `__all__` is its classes, and its docstring draws each of them."""
    classes = {name for name, cls in vars(errors).items() if inspect.isclass(cls)}
    assert set(errors.__all__) == classes
    drawn = set(re.findall(r"[├└]── (\w+)", errors.__doc__ or "")) | {"KeybrakeError"}
    assert drawn == classes


@pytest.mark.parametrize(("old", "name"), [(m, n) for m, names in MOVED.items() for n in names])
def test_moved_errors_import_from_where_they_were(old: str, name: str) -> None:
    module = importlib.import_module(old)
    assert getattr(module, name) is getattr(errors, name)
    assert name in module.__all__


@pytest.mark.parametrize("name", VALUE_ERRORS)
def test_value_errors_stay_value_errors(name: str) -> None:
    cls = _resolve(name)
    assert isinstance(cls, type)
    assert issubclass(cls, errors.KeybrakeError)
    assert issubclass(cls, ValueError)
