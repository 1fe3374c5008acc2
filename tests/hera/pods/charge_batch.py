"""A billing-agent pod for the end-to-end tests: charges one batch through the real Stripe SDK,
configured only from the environment the keybrake fan-out template gives it.

The batch is the last argument (also in KEYBRAKE_ITEM): JSON such as {"charges": 2, "cents": 150},
{"crash": true} (crashes before charging), {"charges": 2, "crash_after": true} (charges, then
crashes: Argo retries the item in a new pod) or {"crash_unless": PATH} (crashes until the file at
PATH exists: a bug fixed before `argo retry`). Each charge's metadata names its batch, index and
pod, so distinct charges are distinct requests (the proxy collapses identical ones within its
dedupe window: a retried pod's charges would otherwise be replays of the first pod's).

It follows keybrake's exit-code convention: 77 when keybrake refuses (cap hit, refused key,
endpoint not allowed), so Argo does not retry; any other failure is retried."""

from __future__ import annotations

import json
import os
import sys

import stripe

REFUSED = 77


def main(argv: list[str]) -> int:
    batch = json.loads(argv[-1])
    if batch.get("crash") or (
        batch.get("crash_unless") and not os.path.exists(batch["crash_unless"])
    ):
        raise RuntimeError("this batch crashes before charging (a transient failure)")
    client = stripe.StripeClient(
        os.environ["STRIPE_SECRET_KEY"], base_addresses={"api": os.environ["STRIPE_BASE_URL"]}
    )
    for index in range(int(batch.get("charges", 1))):
        try:
            intent = client.v1.payment_intents.create(
                params={
                    "amount": int(batch.get("cents", 100)),
                    "currency": "usd",
                    "metadata": {
                        "batch": argv[-1],
                        "charge": str(index),
                        "pod": os.environ.get("HOSTNAME", ""),
                    },
                }
            )
        except stripe.RateLimitError as exc:
            headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
            if headers.get("x-keybrake-cap-hit") == "true":
                print(f"keybrake cap hit: {exc.user_message or exc}", file=sys.stderr)
                return REFUSED
            raise
        except (stripe.AuthenticationError, stripe.PermissionError) as exc:
            print(f"keybrake refused the key: {exc.user_message or exc}", file=sys.stderr)
            return REFUSED
        print(f"charged {intent.id}", flush=True)
    if batch.get("crash_after"):
        raise RuntimeError("this batch crashes after charging (a transient failure)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
