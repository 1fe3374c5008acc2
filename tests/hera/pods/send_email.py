"""A notification pod for the end-to-end tests: sends one email with the Resend SDK and no
configuration code at all; RESEND_API_KEY and RESEND_API_URL from the template are enough."""

import sys

import resend

sent = resend.Emails.send(
    {
        "from": "Shop <orders@example.com>",
        "to": [f"{sys.argv[-1]}@example.com"],
        "subject": "Your order shipped",
        "text": "It is on its way.",
    }
)
print(f"sent {sent['id']}")
