"""Fixtures of the Hera template tests, defined in hera_fixtures.py (shared with the end-to-end
runs under tests/e2e/hera/): the rendered documents, the catalog, and a stand-in cluster."""

from __future__ import annotations

from hera_fixtures import catalog, cluster, documents, rendered

__all__ = ["catalog", "cluster", "documents", "rendered"]
