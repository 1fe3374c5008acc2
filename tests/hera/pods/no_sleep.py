"""Run a keybrake step script with its backoff sleeps skipped (for tests of exhausted retries):
`python no_sleep.py SCRIPT` executes SCRIPT as __main__ with time.sleep a no-op."""

import runpy
import sys
import time

time.sleep = lambda seconds: None
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
