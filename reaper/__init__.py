"""The run reaper: `keybrake reaper` watches Argo Workflows and revokes the keys and budgets of
runs that ended without their exit handler doing so (terminated, deleted, a failed exit handler,
a controller outage). See `keybrake.reaper.reaper`."""

from keybrake.reaper.reaper import Reaper, Revocation
from keybrake.reaper.runs import FINAL_PHASES, LiveSubject, Run, RunBook, verdict

__all__ = ["FINAL_PHASES", "LiveSubject", "Reaper", "Revocation", "Run", "RunBook", "verdict"]
