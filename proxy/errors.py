"""One exception tree for the proxy and its client.

KeybrakeError
├── ConfigError          bad settings or pricing data; raised at start-up, names the bad item
├── StoreUnavailable     the database cannot be reached or refused a write (fail closed: 503)
│   └── SchemaNewer      a newer build migrated the database: this one forwards nothing
│       └── RulesNewer   a newer build loaded newer ledger rules into it: the same
└── ClientError          raised by keybrake.proxy.client
    ├── ProxyUnreachable the proxy did not answer at the URL tried
    └── ApiError         the proxy answered with an error (status, type, message)
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "ClientError",
    "ConfigError",
    "KeybrakeError",
    "ProxyUnreachable",
    "RulesNewer",
    "SchemaNewer",
    "StoreUnavailable",
]


class KeybrakeError(Exception):
    """Base of every error keybrake raises on purpose."""


class ConfigError(KeybrakeError):
    """Settings or pricing data that cannot be used; the message names the offending item."""


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
