"""Never echo a secret: vault keys (`kbv_…`), issuer tokens (`kbi_…`) and JWTs (service-account
tokens) are cut out of any text keybrake sends back or logs, wherever a caller put them (a key
id argument, a path, a label)."""

from __future__ import annotations

import logging
import re

__all__ = ["RedactingFilter", "redact"]

_SECRET = re.compile(
    r"(?P<prefix>kbv_|kbi_)[A-Za-z0-9_\-]+"
    r"|eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"
)


def _replace(match: re.Match[str]) -> str:
    prefix = match.group("prefix")
    return f"{prefix}…(redacted)" if prefix else "<a token, redacted>"


def redact(text: str) -> str:
    if "kbv_" not in text and "kbi_" not in text and "eyJ" not in text:
        return text  # the common case, on every vendor call: no regex
    return _SECRET.sub(_replace, text)


class RedactingFilter(logging.Filter):
    """Redacts log records' formatted messages (and drops their arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
