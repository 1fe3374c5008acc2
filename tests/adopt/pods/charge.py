"""A stock billing pod, as teams write it before keybrake: the Stripe SDK's global client,
its key from STRIPE_SECRET_KEY, one PaymentIntent of $1.00 per customer id in its argument. The
only line added for keybrake is the one `keybrake wrap` asks for (marked below)."""

import os
import sys

import stripe

stripe.api_base = os.environ["STRIPE_BASE_URL"]  # the change `keybrake wrap` reported
stripe.api_key = os.environ["STRIPE_SECRET_KEY"]
stripe.max_network_retries = 0

for customer in sys.argv[-1].split(","):
    intent = stripe.PaymentIntent.create(
        amount=100, currency="usd", metadata={"customer": customer, "run": "wrapped"}
    )
    print(f"charged {customer}: {intent.id}")
