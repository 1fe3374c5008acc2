"""The retry strategy of keybrake steps and fan-out pods, and the exit code it never retries.

Exit-code convention, for keybrake's own steps and for your fan-out pods:

- `77` (`EX_NOPERM` in sysexits.h): keybrake said no. The cap is spent (HTTP 429 with
  `X-Keybrake-Cap-Hit: true`), the key was refused (401: revoked, expired, unknown), the endpoint
  or account is not allowed for it (403), the call is outside the key's constraints (403,
  `keybrake_constraint_violated`), the request is one the vendor could read differently
  (400, `keybrake_ambiguous_request`), or an earlier attempt's outcome is unknown (422,
  `keybrake_outcome_unknown`). Retrying cannot help, so it is never retried. A pod running its
  calls through the pod helper (`keybrake_pod`) exits so by itself, and waits out a rate limit
  (HTTP 429 with `X-Keybrake-Rate-Limited: true`) inside the pod instead of failing.
- anything else non-zero: treated as transient (connection refused, a 5xx, a crash) and retried
  up to `limit` times with exponential backoff.

Why `retryPolicy: Always` and not `OnError`: Argo ANDs the policy with the expression, and under
`OnError` a pod whose main container exits non-zero (a *Failed* node) is never retried, whatever
the expression says (`processNodeRetries` in workflow/controller/operator.go). Expression
variables are strings, hence `asInt(lastRetry.exitCode)`; it is `"-1"` when the pod never ran
(an *Error* node: evicted, deleted), which is retried.
See <https://argo-workflows.readthedocs.io/en/latest/retries/>.
"""

from __future__ import annotations

from hera.workflows.models import Backoff, IntOrString, RetryStrategy

from .errors import TemplateConfigError

__all__ = [
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "RETRY_EXPRESSION",
    "default_retry_strategy",
    "exit_handler_retry_strategy",
]

EXIT_REFUSED = 77
"""A pod exits with this when keybrake refused it: cap hit, refused key, endpoint not allowed."""

EXIT_UNAVAILABLE = 75
"""keybrake's own steps exit with this (`EX_TEMPFAIL`) when the proxy stayed unreachable."""

RETRY_EXPRESSION = f"asInt(lastRetry.exitCode) != {EXIT_REFUSED}"


def default_retry_strategy(limit: int = 3) -> RetryStrategy:
    """Retry transient failures `limit` times (backoff 10s, 20s, 40s, ...), never exit code 77."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 20:
        raise TemplateConfigError(f"retry limit must be an integer from 0 to 20, got {limit!r}")
    return RetryStrategy(
        limit=IntOrString(limit),
        retry_policy="Always",
        expression=RETRY_EXPRESSION,
        backoff=Backoff(duration="10s", factor=IntOrString(2), cap="5m"),
    )


def exit_handler_retry_strategy() -> RetryStrategy:
    """The revoke step always exits 0, so only pod-level errors (evicted, deleted) are retried."""
    return RetryStrategy(
        limit=IntOrString(3),
        retry_policy="OnError",
        backoff=Backoff(duration="5s", factor=IntOrString(2)),
    )
