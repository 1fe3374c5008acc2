"""Storage backends behind one interface; `open_store` picks one from the database URL."""

from __future__ import annotations

from keybrake.proxy.errors import ConfigError
from keybrake.proxy.store.protocol import Store

__all__ = ["Store", "open_store", "sqlite_path"]


def sqlite_path(url: str) -> str | None:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db` or `sqlite:///:memory:` → path."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///")
    if not path:
        raise ConfigError("database URL sqlite:/// names no file, e.g. sqlite:///keybrake.db")
    return path


def open_store(url: str, *, durable_commits: bool = True) -> Store:
    """`durable_commits=False` lets PostgreSQL acknowledge a commit before flushing it to disk
    (`synchronous_commit = off`): still safe against a crash of the proxy, not of the database
    server, which may lose its last fraction of a second of commits."""
    path = sqlite_path(url)
    if path is not None:
        from keybrake.proxy.store.sqlite import SQLiteStore

        return SQLiteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from keybrake.proxy.store.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError("PostgreSQL support is not available in this build") from exc
        store: Store = PostgresStore(url, durable_commits=durable_commits)
        return store
    raise ConfigError(
        f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite:///PATH or postgresql://..."
    )
