"""keybrake's answers, read inside a pod: wait out a rate limit, exit 77 on a refusal.

A pod calling Stripe, Twilio or Resend through keybrake gets keybrake's answers as its SDK's usual
exceptions. This module tells them apart and does what each calls for:

- **cap hit** (`429` with `X-Keybrake-Cap-Hit: true`) and **refused** (a 4xx carrying a
  `keybrake_…` code: a revoked, expired or unknown key, an endpoint, account or constraint outside
  the key's scope, an ambiguous request, an earlier call's unknown outcome, or any refusal
  keybrake adds later, such as an approval refused): final. The pod exits 77, which the
  retryStrategy of keybrake's templates never retries (or `Refused` is raised).
- **rate limited** (`429` with `X-Keybrake-Rate-Limited: true` and `Retry-After`): nothing was
  forwarded, so the same call is sent again after `Retry-After`, inside the pod, up to a bound.
  stripe-python ignores `Retry-After` (it retries a 429 only when the answer says
  `Stripe-Should-Retry: true`, on its own backoff of a second or two, at most twice by default
  with the global API and not at all with a `StripeClient`); twilio and resend never retry.
- **proxy error** (keybrake's own 5xx or 408) and **vendor error** (everything else, a vendor's
  own 429 included): raised unchanged, for the pod's code or Argo's retryStrategy.

```python
import keybrake_pod

intent = keybrake_pod.call(client.v1.payment_intents.create, params={"amount": 100, ...})
keybrake_pod.watch(twilio_client)   # once: twilio's exception keeps no headers (Retry-After)
```

What each SDK's exception keeps, read by duck typing (no SDK is imported here): stripe-python's
`StripeError` keeps the status, headers and body; twilio's `TwilioRestException` the status,
Twilio's numeric code and the body's `details`, where keybrake names its code, so its refusals
are told apart, but no headers: without `watch(client)` a rate limit waits `default_wait`, not
its `Retry-After`; resend's `ResendError` the status and headers, where keybrake names its code
(`X-Keybrake-Code`), which is enough. An exception with a `response` (httpx, requests) is read
from that.

Where it lives, and how a pod gets it. The pods run the user's own image, which has neither
keybrake nor its dependencies (Starlette, Hera, pydantic, ...), so this is one file that imports
the standard library only (Python 3.8 or later) and nothing of keybrake: it works copied into the
image beside the pod's code, as `keybrake_pod.py`. Run as a module it prints itself:
`python -m keybrake.hera_workflows.keybrake_pod > keybrake_pod.py`. It ships in
`keybrake.hera_workflows`, next to the standard-library scripts keybrake's own step pods run
(`_step_*.py`). It is not mounted into the fan-out pods by `fan_out`: a pod's code would need its
import path changed to find a mounted file (setting `PYTHONPATH` would override the image's own),
every Workflow object would carry the file, and the image's owner should pin and review the code
the image runs, as with any other dependency.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, NoReturn, TypeVar

__all__ = [
    "AGAIN",
    "CAP_HIT",
    "EXIT_REFUSED",
    "OK",
    "PROXY_ERROR",
    "RATE_LIMITED",
    "REFUSED",
    "VENDOR_ERROR",
    "Answer",
    "Caller",
    "Refused",
    "call",
    "classify",
    "classify_error",
    "retry_after_seconds",
    "watch",
]

EXIT_REFUSED = 77
"""The exit code of a pod keybrake refused (`EX_NOPERM`): Argo's retryStrategy never retries it."""

# What an answer is (`Answer.kind`).
OK = "ok"
CAP_HIT = "cap_hit"
REFUSED = "refused"
RATE_LIMITED = "rate_limited"
AGAIN = "again"  # nothing was forwarded, and the same call may go again at once
PROXY_ERROR = "proxy_error"
VENDOR_ERROR = "vendor_error"

_CAP_HIT_HEADER = "x-keybrake-cap-hit"
_RATE_LIMITED_HEADER = "x-keybrake-rate-limited"
_CODE_HEADER = "x-keybrake-code"  # keybrake's code, on every answer it gives itself
# keybrake's codes for a call that may simply be sent again (the key's constraints changed twice
# while the proxy admitted it: nothing was forwarded).
_AGAIN_CODES = frozenset({"keybrake_policy_changed"})
# keybrake's cap codes, read when an answer's headers did not come with it (the proxy's
# `keybrake.proxy.decisions`; tests/test_keybrake_pod.py holds the two to each other).
_CAP_CODES = frozenset(
    {
        "keybrake_daily_cap_exceeded",
        "keybrake_per_call_cap_exceeded",
        "keybrake_caller_cap_exceeded",
        "keybrake_total_cap_exceeded",
        "keybrake_budget_exceeded",
    }
)
_MAX_BODY = 64 * 1024  # larger bodies are not keybrake's refusals: not parsed
_MAX_MESSAGE = 300
# Never echoed: vault keys, issuer tokens, vendor secret keys, JWTs.
_SECRET = re.compile(
    r"\b(?:kbv|kbi)_[A-Za-z0-9_\-]+|\b[rs]k_(?:live|test)_[A-Za-z0-9]+"
    r"|\beyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"
)

T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    """What an answer from (or through) keybrake is."""

    kind: str  # OK, CAP_HIT, REFUSED, RATE_LIMITED, AGAIN, PROXY_ERROR or VENDOR_ERROR
    status: int | None = None
    code: str | None = None  # keybrake's code (`keybrake_…`), when the answer is keybrake's
    retry_after: float | None = None  # seconds, when a rate-limited answer gave them
    message: str = ""  # the answer's message, secrets cut out, shortened

    @property
    def final(self) -> bool:
        """Whether sending the same call again cannot help: a cap hit or a refusal."""
        return self.kind in (CAP_HIT, REFUSED)

    def describe(self) -> str:
        what = self.kind.replace("_", " ")
        said = ", ".join(part for part in (f"HTTP {self.status}", self.code) if part)
        return f"{what} ({said})" + (f": {self.message}" if self.message else "")


class Refused(Exception):
    """keybrake refused the call for good (a cap hit or a refusal): `answer` says which. Raised
    instead of exiting 77 by a `Caller(exit_on_refusal=False)`, from the SDK's exception."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.describe())
        self.answer = answer


# -- the classifier ---------------------------------------------------------------------------


def classify(
    status: int | None, headers: Mapping[str, str] | None = None, body: object = None
) -> Answer:
    """What an HTTP answer is, from its status, headers and body (a decoded JSON object, or
    bytes or text): keybrake's code is read from each vendor's error shape (Stripe's
    `error.code`, Twilio's and Resend's `keybrake_code`)."""
    if status is None or status < 400:
        return Answer(OK, status)
    seen = _lowered(headers)
    fields = _fields(body)
    code = _keybrake_code(fields) or _keybrake_code({"keybrake_code": seen.get(_CODE_HEADER)})
    message = _message(fields)
    # A cap hit first, by its code or its header (a cap code this copy does not know yet is
    # still final, never waited on as a rate limit).
    if code in _CAP_CODES or _is_true(seen.get(_CAP_HIT_HEADER)):
        return Answer(CAP_HIT, status, code, None, message)
    if code in _AGAIN_CODES:
        return Answer(AGAIN, status, code, retry_after_seconds(seen.get("retry-after")), message)
    if _is_true(seen.get(_RATE_LIMITED_HEADER)) or (status == 429 and code is not None):
        wait = retry_after_seconds(seen.get("retry-after"))
        return Answer(RATE_LIMITED, status, code, wait, message)
    if code is None:
        return Answer(VENDOR_ERROR, status, None, None, message)
    if status < 500 and status != 408:  # 408: the body was slow to arrive; send it again
        return Answer(REFUSED, status, code, None, message)
    return Answer(PROXY_ERROR, status, code, None, message)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` in seconds (delta-seconds, or an HTTP date compared with `now`, default the
    wall clock); None when missing or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def classify_error(error: BaseException) -> Answer | None:
    """What an SDK's exception says the answer was; None when it holds no HTTP answer (a
    connection error, a bug)."""
    found = _answer_of(error)
    return None if found is None else classify(*found)


def _answer_of(error: BaseException) -> tuple[int, Mapping[str, str] | None, object] | None:
    """(status, headers, body) from an SDK's exception, by duck typing."""
    status = _status(getattr(error, "http_status", None))
    if status is not None:  # stripe-python's StripeError
        body = getattr(error, "json_body", None) or getattr(error, "http_body", None)
        return status, getattr(error, "headers", None), body
    status = _status(getattr(error, "status", None))
    if status is not None and hasattr(error, "uri"):  # twilio's TwilioRestException
        said = getattr(error, "msg", None) or getattr(error, "detail", None)
        return _with_seen(
            status, None, {"message": said, "details": getattr(error, "details", None)}
        )
    if hasattr(error, "error_type") and hasattr(error, "suggested_action"):  # resend's ResendError
        code = str(getattr(error, "code", ""))
        status = _status(int(code)) if code.isdigit() else None
        if status is None:
            return None
        said = getattr(error, "message", None)
        return _with_seen(status, getattr(error, "headers", None), {"message": said})
    response = getattr(error, "response", None)  # httpx.HTTPStatusError, requests.HTTPError
    status = _status(getattr(response, "status_code", None))
    if status is not None:
        return status, getattr(response, "headers", None), getattr(response, "text", None)
    return None


def _status(value: object) -> int | None:
    """`value` if it is an HTTP status."""
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return None


def _is_true(value: str | None) -> bool:
    return value is not None and value.lower() == "true"


def _lowered(headers: object) -> dict[str, str]:
    """The headers, names lower-cased."""
    items = getattr(headers, "items", None)
    if not callable(items):
        return {}
    try:
        return {str(name).lower(): str(value).strip() for name, value in items()}
    except (TypeError, ValueError):
        return {}


def _fields(body: object) -> Mapping[str, Any]:
    if isinstance(body, (bytes, str)) and len(body) <= _MAX_BODY:
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):  # (a deeply nested body: not keybrake's)
            return {}
    return body if isinstance(body, Mapping) else {}


def _keybrake_code(fields: Mapping[str, Any]) -> str | None:
    error = fields.get("error")
    details = fields.get("details")
    for code in (
        fields.get("keybrake_code"),  # Twilio's and Resend's shapes
        error.get("code") if isinstance(error, Mapping) else None,  # Stripe's
        details.get("keybrake_code") if isinstance(details, Mapping) else None,
    ):
        if isinstance(code, str) and code.startswith("keybrake_") and len(code) <= 64:
            return code
    return None


def _message(fields: Mapping[str, Any]) -> str:
    error = fields.get("error")
    said = error.get("message") if isinstance(error, Mapping) else fields.get("message")
    if not isinstance(said, str):
        return ""
    said = _SECRET.sub("<redacted>", " ".join(said.split()))
    return said if len(said) <= _MAX_MESSAGE else said[: _MAX_MESSAGE - 1] + "…"


# -- the SDKs whose exceptions drop the answer --------------------------------------------------

_seen = threading.local()


def watch(sdk: T) -> T:
    """Let the helper read keybrake's whole answer where the SDK's exception drops it: a twilio
    `Client`, or the `resend` module. Wraps its HTTP client (`http_client`, or resend's
    `default_http_client`) so that this thread's last error answer is kept for `classify_error`;
    returns `sdk`. Synchronous clients only; watching twice changes nothing."""
    for attribute in ("http_client", "default_http_client"):
        client = getattr(sdk, attribute, None)
        if client is None or not callable(getattr(client, "request", None)):
            continue
        if getattr(client, "is_async", False) is True:
            raise TypeError("keybrake_pod.watch() takes a synchronous client")
        if not isinstance(client, _Recording):
            setattr(sdk, attribute, _Recording(client))
        return sdk
    raise TypeError(
        "keybrake_pod.watch() takes an SDK client or module whose `http_client` or "
        "`default_http_client` has a `request` method"
    )


class _Recording:
    """An SDK's HTTP client, keeping the last error answer it returned (in this thread)."""

    def __init__(self, client: Any) -> None:
        object.__setattr__(self, "_client", client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._client, name, value)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        result = self._client.request(*args, **kwargs)
        if isinstance(result, tuple) and len(result) == 3:  # resend: (content, status, headers)
            body, status, headers = result
        else:  # twilio: a Response with status_code, text and headers
            status = getattr(result, "status_code", None)
            headers, body = getattr(result, "headers", None), getattr(result, "text", None)
        status = _status(status)
        error = status is not None and status >= 400
        _seen.answer = (status, _lowered(headers), body) if error else None
        return result


def _with_seen(
    status: int, headers: Mapping[str, str] | None, body: object
) -> tuple[int, Mapping[str, str] | None, object]:
    """The answer a watched client saw for this exception, when it saw one (same status)."""
    seen = getattr(_seen, "answer", None)
    if seen is None or seen[0] != status:
        return status, headers, body
    return status, {**seen[1], **_lowered(headers)}, seen[2]


# -- the runner --------------------------------------------------------------------------------


class Caller:
    """Runs SDK calls the way keybrake's answers ask: `call(fn, *args, **kwargs)` returns what
    `fn` returns; after a rate limit it sleeps `Retry-After` (`default_wait` when missing or
    unreadable, at most `max_wait`) and calls `fn` again, at most `max_waits` times and for at
    most `max_total_wait` seconds in all, then re-raises the SDK's exception (the pod fails, and
    Argo's retryStrategy may run it later); after a cap hit or a refusal it says why on stderr
    and exits `EXIT_REFUSED` (or raises `Refused`, with `exit_on_refusal=False`); any other
    exception is re-raised unchanged. `sleep` and `clock` are for tests; `stream` takes the
    messages instead of stderr."""

    def __init__(
        self,
        *,
        exit_on_refusal: bool = True,
        max_wait: float = 61.0,  # a call rate frees a place at most 61 s after a call
        max_waits: int = 30,
        max_total_wait: float = 900.0,
        default_wait: float = 5.0,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        stream: IO[str] | None = None,
    ) -> None:
        for name, value in (
            ("max_wait", max_wait),
            ("max_total_wait", max_total_wait),
            ("default_wait", default_wait),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number of seconds, at least 0: {value!r}")
        if not isinstance(max_waits, int) or max_waits < 0:
            raise ValueError(f"max_waits must be a whole number, at least 0: {max_waits!r}")
        self.exit_on_refusal = exit_on_refusal
        self.max_wait = float(max_wait)
        self.max_waits = max_waits
        self.max_total_wait = float(max_total_wait)
        self.default_wait = min(float(default_wait), self.max_wait)
        self._sleep = sleep
        self._clock = clock
        self._stream = stream

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        waits = 0
        deadline = self._clock() + self.max_total_wait
        while True:
            _seen.answer = None
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                answer = classify_error(error)
                if answer is None or answer.kind not in (CAP_HIT, REFUSED, RATE_LIMITED, AGAIN):
                    raise
                if answer.final:
                    self._refuse(answer, error)
                wait = self.default_wait if answer.retry_after is None else answer.retry_after
                wait = min(wait, self.max_wait)
                if waits >= self.max_waits or self._clock() + wait > deadline:
                    still = "rate limited" if answer.kind == RATE_LIMITED else "not admitted"
                    self._say(
                        f"{answer.describe()}; still {still} after {waits} wait(s), "
                        "giving up: the pod fails, and its retryStrategy may run it again"
                    )
                    raise
                waits += 1
                self._say(
                    f"{answer.describe()}; waiting {wait:g}s before sending it again "
                    f"(wait {waits} of at most {self.max_waits})"
                )
                self._sleep(wait)

    def _refuse(self, answer: Answer, error: Exception) -> NoReturn:
        if not self.exit_on_refusal:
            raise Refused(answer) from error
        self._say(f"{answer.describe()}; exiting {EXIT_REFUSED}: Argo does not retry it")
        raise SystemExit(EXIT_REFUSED)

    def _say(self, text: str) -> None:
        print(f"keybrake_pod: {text}", file=self._stream or sys.stderr, flush=True)


def call(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, run by a `Caller()` with its defaults: a rate limit waited out and
    the call sent again, a cap hit or a refusal exits 77, anything else raised unchanged."""
    return Caller().call(fn, *args, **kwargs)


if __name__ == "__main__":  # `python -m keybrake.hera_workflows.keybrake_pod > keybrake_pod.py`
    with open(__file__, encoding="utf-8") as source:
        sys.stdout.write(source.read())
