"""A fan-out pod for tests that need no vendor: prints its arguments and whole environment as
JSON, then exits with the code its item asks for (an item such as {"exit": 77}; default 0)."""

import json
import os
import sys

# Python adds LC_CTYPE to its own environment when started without a locale (PEP 538).
env = {k: v for k, v in os.environ.items() if k != "LC_CTYPE"}
print(json.dumps({"argv": sys.argv[1:], "env": env}))
try:
    item = json.loads(os.environ.get("KEYBRAKE_ITEM", ""))
except ValueError:
    item = None
sys.exit(int(item.get("exit", 0)) if isinstance(item, dict) else 0)
