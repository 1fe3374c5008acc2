"""Every way the proxy can refuse a vendor call: HTTP status, vendor error code, message."""

from __future__ import annotations

__all__ = ["REFUSALS", "refusal_status"]

REFUSALS: dict[str, tuple[int, str, str]] = {
    "bad_path": (400, "keybrake_invalid_path", "The request path is not allowed."),
    "too_large": (413, "keybrake_body_too_large", "The request body exceeds the proxy's limit."),
    "no_key": (401, "keybrake_missing_key", "No vault key was provided."),
    "unknown_key": (401, "keybrake_invalid_key", "Invalid vault key provided."),
    "wrong_vendor": (401, "keybrake_wrong_vendor", "This vault key is for another vendor."),
    "revoked": (401, "keybrake_key_revoked", "This vault key has been revoked."),
    "expired": (401, "keybrake_key_expired", "This vault key has expired."),
    "endpoint_denied": (403, "keybrake_endpoint_not_allowed", "This vault key may not call {ep}."),
    "unpriceable": (403, "keybrake_unpriced_endpoint", "{reason}"),
    "lookup_failed": (502, "keybrake_lookup_failed", "Could not price the call: {reason}"),
    "cap_hit": (429, "keybrake_daily_cap_exceeded", "The vault key's daily USD cap is reached."),
    "per_call_cap_hit": (
        429,
        "keybrake_per_call_cap_exceeded",
        "This call costs more than the vault key's per-call USD cap.",
    ),
    "in_progress": (
        409,
        "idempotency_key_in_use",
        "An identical request with this key is still being processed; retry shortly.",
    ),
    "idempotency_mismatch": (
        400,
        "idempotency_error",
        "Keys for idempotent requests can only be used with the same parameters they were first "
        "used with.",
    ),
    "upstream_error": (
        502,
        "keybrake_upstream_error",
        "The vendor did not answer: {reason} The call may have gone through and counts as spent.",
    ),
    "store_unavailable": (
        503,
        "keybrake_unavailable",
        "The proxy cannot reach its database; no call was forwarded.",
    ),
}


def refusal_status(decision: str) -> int:
    """The HTTP status a refusal answers with (0 for decisions that are not refusals)."""
    return REFUSALS[decision][0] if decision in REFUSALS else 0
