"""The billing agent: a $300/day Stripe vault key, batches charged in parallel, revoked on exit.

Rendered to templates/examples/billing-agent.yaml by `keybrake templates render`; submit with
`argo submit templates/examples/billing-agent.yaml -p batches='["eu-1", "us-1", "us-2"]'`.
"""

from __future__ import annotations

from hera.workflows import DAG, Parameter, Workflow

from keybrake.hera_workflows import fan_out, issue_vault_key, revoke_on_exit

with Workflow(
    generate_name="billing-agent-",
    entrypoint="main",
    arguments=[Parameter(name="batches", value='["eu-1", "us-1"]')],
) as workflow:
    with DAG(name="main"):
        key = issue_vault_key(
            vendor="stripe",
            daily_usd_cap=300,
            max_usd_per_call=50,
            allowed_endpoints=["POST /v1/payment_intents"],
        )
        fan_out(
            key,
            "charge",
            image="ghcr.io/acme/billing-agent:1.4",
            command=["billing-agent", "charge"],
            with_param="{{workflow.parameters.batches}}",
            parallelism=2,
        )
    revoke_on_exit(workflow, key)
