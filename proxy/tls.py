"""Serving TLS with a certificate that can be rotated in place (cert-manager rewrites the files of
its Secret volume): the certificate and key are read again at the first handshake after either
file changes, with no restart and no dropped connection. A pair that does not load (say, the
key is new and the certificate not yet) keeps the previous one until it does."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any

import uvicorn

__all__ = ["ReloadingCertificate", "TLSConfig"]

log = logging.getLogger("keybrake.proxy")


class ReloadingCertificate:
    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self._signature = self._stat()
        # New connections start on `base`; it raises at start-up for a pair that does not load.
        self.base = self._load()
        self.base.sni_callback = self._on_hello
        self._current = self.base
        self.reloads = 0

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.cert_file, self.key_file):
            info = os.stat(path)  # follows the ..data symlinks of a Secret volume
            out.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(out)

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def _on_hello(self, connection: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        """Called at every handshake (with or without SNI): swap in a newer certificate."""
        try:
            signature = self._stat()
            if signature != self._signature:
                fresh = self._load()
                self._current, self._signature = fresh, signature
                self.reloads += 1
                log.warning("TLS certificate reloaded from %s", self.cert_file)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS certificate not reloaded (keeping the previous one): %s", exc)
        if self._current is not context:
            connection.context = self._current


class TLSConfig(uvicorn.Config):
    """uvicorn's config, serving with a `ReloadingCertificate` (in each worker process)."""

    def load(self) -> None:
        super().load()
        if self.ssl_certfile and self.ssl_keyfile:
            self.ssl = ReloadingCertificate(
                Path(self.ssl_certfile), Path(str(self.ssl_keyfile))
            ).base
