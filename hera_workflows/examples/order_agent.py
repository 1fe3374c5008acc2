"""The order agent: one run budget, a Stripe key and a Resend key drawing on it, two fan-outs,
everything revoked on exit. However long the run lives and whichever vendor spends it, the run can
never move more than `budget_usd`; no single order may charge more than $50.

Rendered to templates/examples/order-agent.yaml by `keybrake templates render`; submit with
`argo submit templates/examples/order-agent.yaml -p orders='["o-1", "o-2"]' -p budget_usd=500`.
"""

from __future__ import annotations

from hera.workflows import DAG, Parameter, Workflow

from keybrake.hera_workflows import fan_out, issue_budget, issue_vault_key, revoke_on_exit

with Workflow(
    generate_name="order-agent-",
    entrypoint="main",
    arguments=[
        Parameter(name="orders", value='["o-1"]'),
        Parameter(name="budget_usd", value="500"),
    ],
) as workflow:
    with DAG(name="main"):
        budget = issue_budget(total_usd_cap="{{workflow.parameters.budget_usd}}", expires_in="6h")
        stripe = issue_vault_key(
            vendor="stripe",
            budget=budget,
            max_usd_per_caller=50,
            allowed_endpoints=["POST /v1/payment_intents"],
            name="stripe-key",
        )
        resend = issue_vault_key(
            vendor="resend", budget=budget, allowed_endpoints=["POST /emails"], name="resend-key"
        )
        orders = "{{workflow.parameters.orders}}"
        agent = "ghcr.io/acme/order-agent:2"
        fan_out(stripe, "charge", image=agent, command=["order-agent", "charge"], with_param=orders)
        fan_out(resend, "receipt", image=agent, command=["order-agent", "mail"], with_param=orders)
    revoke_on_exit(workflow, budget)
