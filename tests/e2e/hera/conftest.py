"""The end-to-end Hera runs use the fixtures of tests/hera/ (hera_fixtures.py there) and its
helpers (argocheck, the pods): that folder is put on the import path, as pytest puts it there for
the tests in it."""

from __future__ import annotations

import sys
from pathlib import Path

HERA = Path(__file__).resolve().parents[2] / "hera"
if str(HERA) not in sys.path:
    sys.path.insert(0, str(HERA))

from hera_fixtures import catalog, cluster, documents, rendered  # noqa: E402

__all__ = ["HERA", "catalog", "cluster", "documents", "rendered"]
