"""One exception tree for keybrake: the proxy, its client, and the libraries beside them.

KeybrakeError
├── ConfigError            bad settings or pricing data; raised at start-up, names the bad item
│   └── PricingEntryError  a bad entry in a vendor's pricing section (also a ValueError): the
│                          loader turns it into a ConfigError naming the file and line
├── StoreUnavailable       the database cannot be reached or refused a write (fail closed: 503)
│   └── SchemaNewer        a newer build migrated the database: this one forwards nothing
│       └── RulesNewer     a newer build loaded newer ledger rules into it: the same
├── VaultError             the vault (admin API, dashboard) refuses a request: its HTTP status,
│   │                      error type and message, rendered in one place by each adapter
│   ├── InvalidRequest     the request cannot be done as sent: 400 (408: its body came too slowly)
│   ├── IdempotencyMismatch  an Idempotency-Key used before with another request: 400
│   ├── NotFound           no such key, budget or issuer (or none the caller may see): 404
│   ├── Conflict           not in a state to do it (revoked, expired, changed meanwhile): 409
│   └── AccessError        the vault will not act for this caller
│       ├── LoginRefused   no valid credentials: 401
│       └── Forbidden      outside the caller's policy or scope: 403 naming the limit broken
├── CursorError            not a `continue` token of this listing: 400 (also a ValueError)
├── EstimateError          a vendor call whose cost cannot be known safely: refused, not forwarded
│   ├── AmbiguousRequest   the vendor could read the request differently from the proxy: 400
│   ├── Unpriceable        no price for the call (an operator adds one): 403
│   └── LookupFailed       the vendor lookup the estimate needs failed: 502
├── Unreadable             a constrained field the call does not say exactly: refused, 403
│   └── Unchecked          one only a lookup could read, under report-only constraints: noted
├── UpstreamError          no usable answer from the vendor (timeout, dropped connection, an
│                          oversized body): 502, and the call counts as spent
└── ClientError            raised by keybrake.proxy.client
    ├── ProxyUnreachable   the proxy did not answer at the URL tried
    └── ApiError           the proxy answered with an error (status, type, message)

Beside the proxy, each defined in its own package and deriving from `KeybrakeError`:
`keybrake.hera_workflows.TemplateConfigError` (also a ValueError),
`keybrake.adopt.wrap.WrapError` and `keybrake.adopt.yaml_bound.TooManyAliasNodes`.

The proxy's modules that raised these before they lived here still export them
(`keybrake.proxy.access.Forbidden`, `keybrake.proxy.pricing.Unpriceable`, ...). A module keeps an
exception of its own only as a signal that never leaves it (`pipeline._Refused`,
`store.sql.Refused`); tests/test_public_surface.py lists each, with why.
"""

from __future__ import annotations

__all__ = [
    "AccessError",
    "AmbiguousRequest",
    "ApiError",
    "ClientError",
    "ConfigError",
    "Conflict",
    "CursorError",
    "EstimateError",
    "Forbidden",
    "IdempotencyMismatch",
    "InvalidRequest",
    "KeybrakeError",
    "LoginRefused",
    "LookupFailed",
    "NotFound",
    "PricingEntryError",
    "ProxyUnreachable",
    "RulesNewer",
    "SchemaNewer",
    "StoreUnavailable",
    "Unchecked",
    "Unpriceable",
    "Unreadable",
    "UpstreamError",
    "VaultError",
]


class KeybrakeError(Exception):
    """Base of every error keybrake raises on purpose."""


class ConfigError(KeybrakeError):
    """Settings or pricing data that cannot be used; the message names the offending item."""


class PricingEntryError(ConfigError, ValueError):
    """A bad entry in a vendor's pricing section, raised by its `validate_pricing`.

    `entry` is the entry's key as written in the file and `table` the sub-table holding it
    (`"sms"` for `[twilio.sms]`), so the loader names the right line even when the same key (a
    destination prefix, say) appears in several tables.
    """

    def __init__(self, message: str, *, entry: str, table: str | None = None) -> None:
        super().__init__(message)
        self.entry = entry
        self.table = table


class StoreUnavailable(KeybrakeError):
    """The database could not be reached or did not accept a write."""


class SchemaNewer(StoreUnavailable):
    """The database's schema is newer than this build's: a newer keybrake migrated it, and its
    rules may differ from the ones this build enforces, so this replica fails closed until it is
    upgraded (docs/deploy.md, upgrading: migrate with the new build, then roll the replicas)."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"the database's schema is version {found}, newer than this build's {known}: a newer "
            "keybrake migrated it; this replica forwards no vendor call until it is upgraded"
        )
        self.found = found
        self.known = known


class RulesNewer(SchemaNewer):
    """The database's ledger rules are newer than this build's (`decisions.RULE_VERSION`): a
    newer keybrake loaded them, so this replica would admit calls by rules that no longer hold."""

    def __init__(self, found: int, known: int) -> None:
        StoreUnavailable.__init__(
            self,
            f"the database's ledger rules are version {found}, newer than this build's {known}: "
            "a newer keybrake loaded them; this replica forwards no vendor call until it is "
            "upgraded",
        )
        self.found = found
        self.known = known


class VaultError(KeybrakeError):
    """A request the vault refuses: `status` and `error_type` are the HTTP answer's, `code`
    names the rule broken (when one is), `message` is safe to show (never a secret)."""

    status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        if status is not None:
            self.status = status


class InvalidRequest(VaultError):
    """The request cannot be done as sent; the message says what to change."""


class IdempotencyMismatch(VaultError):
    """An `Idempotency-Key` used before with a different request."""

    error_type = "idempotency_error"

    def __init__(self) -> None:
        super().__init__(
            "Idempotency-Key: this key was used with a different request; use a new key"
        )


class NotFound(VaultError):
    """No such key, budget or issuer, or none the caller may see."""

    status = 404
    error_type = "not_found"


class Conflict(VaultError):
    """Not in a state to do it: revoked, expired, deleted, or changed meanwhile."""

    status = 409
    error_type = "conflict"


class AccessError(VaultError):
    """The vault will not act for this caller."""


class LoginRefused(AccessError):
    """No valid credentials: a 401. `message` is safe to show (it never holds the token)."""

    status = 401
    error_type = "authentication_error"

    def __init__(self, message: str, identity: str | None = None) -> None:
        super().__init__(message)
        self.identity = identity  # who the token claimed to be, when it was readable


class Forbidden(AccessError):
    """Outside the caller's policy or scope: `limit` names the rule, `message` says how."""

    status = 403
    error_type = "permission_error"

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message, code=limit)
        self.limit = limit


class CursorError(KeybrakeError, ValueError):
    """Not a `continue` token of this listing."""


class EstimateError(KeybrakeError):
    """A vendor call whose cost cannot be known safely: the pipeline refuses it before anything
    is forwarded, answering with the decision of the subclass."""


class AmbiguousRequest(EstimateError):
    """The vendor could read this request differently from the proxy (content type, a repeated
    or unknown field, a query string), so it is refused (a 400); the message says what to send."""


class Unpriceable(EstimateError):
    """The cost of this call cannot be known, so it is refused (fail closed, a 403); the message
    says how an operator prices it."""


class LookupFailed(EstimateError):
    """A lookup at the vendor that the estimate needed (the object a refund names, say) failed:
    refused, a 502; the message says what was asked and what came back."""


class Unreadable(KeybrakeError):
    """A constrained field (`keybrake.proxy.constraints`) that a call's body or the object it
    acts on does not say exactly: the call is refused under that constraint, a 403."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


class Unchecked(Unreadable):
    """A field of a report-only constraint that only a lookup of its own could read: report
    mode makes none (it would reach the vendor, and take a place in an enforced call rate), so
    the field goes unchecked and the audit row says so. Raised by the lookup, named by
    `collect` with the field it was reading; `values`: what the call itself names for it (an
    update's new customer), which is checked all the same."""

    def __init__(self, field: str = "", values: tuple[str, ...] = ()) -> None:
        super().__init__(
            field,
            f"{field}: not checked (reading it takes a lookup at the vendor of its own, which "
            "report-only constraints never make)",
        )
        self.values = values


class UpstreamError(KeybrakeError):
    """No usable answer: timeout, refused or dropped connection, or an oversized body."""


class ClientError(KeybrakeError):
    """Raised by the admin client."""


class ProxyUnreachable(ClientError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the keybrake proxy at {url}: {reason}")
        self.url = url
        self.reason = reason


class ApiError(ClientError):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status}, {error_type})")
        self.status = status
        self.error_type = error_type
        self.message = message
