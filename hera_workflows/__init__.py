"""Hera building blocks for the vault-key pattern: issue a capped key, fan out, revoke on exit.

```python
from hera.workflows import DAG, Workflow
from keybrake.hera_workflows import fan_out, issue_vault_key, revoke_on_exit

with Workflow(generate_name="billing-agent-", entrypoint="main") as w:
    with DAG(name="main"):
        key = issue_vault_key(vendor="stripe", daily_usd_cap=300,
                              allowed_endpoints=["POST /v1/payment_intents"])
        fan_out(key, "charge", image="ghcr.io/acme/billing-agent:1.4",
                with_items=["eu", "us"], parallelism=2)
    revoke_on_exit(w, key)
```

`keybrake templates render` turns the published templates (`published.py`) and the examples into
the YAML in `templates/`. See docs/hera.md.
"""

from __future__ import annotations

from .budget import BUDGET_ID_GLOBAL, RunBudget, budget_template, issue_budget
from .connection import DEFAULT_PROXY_URL, ProxyConnection
from .errors import TemplateConfigError
from .fanout import ITEM, fan_out
from .issue import KEY_ID_GLOBAL, VaultKey, issue_template, issue_vault_key
from .retry import EXIT_REFUSED, RETRY_EXPRESSION, default_retry_strategy
from .revoke import SPEND_SUMMARY_GLOBAL, revoke_on_exit, revoke_template
from .shared_templates import SharedTemplates
from .vendors import VENDORS

__all__ = [
    "BUDGET_ID_GLOBAL",
    "DEFAULT_PROXY_URL",
    "EXIT_REFUSED",
    "ITEM",
    "KEY_ID_GLOBAL",
    "RETRY_EXPRESSION",
    "SPEND_SUMMARY_GLOBAL",
    "VENDORS",
    "ProxyConnection",
    "RunBudget",
    "SharedTemplates",
    "TemplateConfigError",
    "VaultKey",
    "budget_template",
    "default_retry_strategy",
    "fan_out",
    "issue_budget",
    "issue_template",
    "issue_vault_key",
    "revoke_on_exit",
    "revoke_template",
]
