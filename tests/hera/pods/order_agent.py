"""The order-agent pod of the multi-vendor example (templates/examples/order-agent.yaml):
`order-agent charge ORDER` charges the order through the Stripe SDK, `order-agent mail ORDER`
sends its receipts through the Resend SDK; each configured only from the environment the
keybrake fan-out template gives it (STRIPE_*, RESEND_*).

ORDER is JSON such as {"order": "o-1", "cents": 3000, "emails": 2, "run": "<tag>"}: `run` lands
in the PaymentIntent's metadata so a test can count what localstripe holds for this run. Exit 77
when keybrake refuses (a cap hit of the key or of the run's budget), so Argo does not retry."""

from __future__ import annotations

import json
import os
import sys

import resend
import stripe

REFUSED = 77


def charge(order: dict[str, object]) -> int:
    client = stripe.StripeClient(
        os.environ["STRIPE_SECRET_KEY"],
        base_addresses={"api": os.environ["STRIPE_BASE_URL"]},
        max_network_retries=0,
    )
    try:
        intent = client.v1.payment_intents.create(
            params={
                "amount": int(str(order.get("cents", 100))),
                "currency": "usd",
                "metadata": {"order": str(order["order"]), "run": str(order.get("run", ""))},
            }
        )
    except stripe.RateLimitError as exc:
        print(f"keybrake cap hit: {exc.user_message or exc}", file=sys.stderr)
        return REFUSED
    print(f"charged {intent.id}", flush=True)
    return 0


def mail(order: dict[str, object]) -> int:
    for index in range(int(str(order.get("emails", 1)))):
        try:
            sent = resend.Emails.send(
                {
                    "from": "Shop <orders@example.com>",
                    "to": ["buyer@example.com"],
                    "subject": f"Receipt {index + 1} for order {order['order']}",
                    "text": "Thank you.",
                }
            )
        except resend.exceptions.RateLimitError as exc:
            print(f"keybrake cap hit: {exc}", file=sys.stderr)
            return REFUSED
        print(f"sent {sent['id']}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    order = json.loads(argv[-1])
    return charge(order) if argv[-2] == "charge" else mail(order)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
