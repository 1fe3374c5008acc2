"""The workflow's own exit handler before keybrake: says the run ended, and how."""

import sys

print(f"notified: run ended {sys.argv[-1]}")
