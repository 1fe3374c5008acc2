"""One exception tree for the proxy and its client.

KeybrakeError
├── ConfigError          bad settings or pricing data; raised at start-up, names the bad item
├── StoreUnavailable     the database cannot be reached or refused a write (fail closed: 503)
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
    "StoreUnavailable",
]


class KeybrakeError(Exception):
    """Base of every error keybrake raises on purpose."""


class ConfigError(KeybrakeError):
    """Settings or pricing data that cannot be used; the message names the offending item."""


class StoreUnavailable(KeybrakeError):
    """The database could not be reached or did not accept a write."""


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
