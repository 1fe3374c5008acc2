"""A notification pod for the end-to-end tests: sends one SMS with the Twilio SDK. Client() reads
TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN from the template's environment; the SDK has no base-URL
variable, hence the one line setting it."""

import os
import sys

from twilio.rest import Client

client = Client()
client.api.base_url = os.environ["TWILIO_BASE_URL"]
message = client.messages.create(to=sys.argv[-1], from_="+14155550199", body="Order shipped")
print(f"sent {message.sid}")
