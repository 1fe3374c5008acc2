"""tests/argo holds Argo v4.1.2's reference data unchanged: the digests in PROVENANCE.md match."""

from __future__ import annotations

import hashlib
import re

from argocheck.schema import DATA, read_data

PROVENANCE = (DATA / "PROVENANCE.md").read_text(encoding="utf-8")
DIGESTS = dict(
    (name, digest) for digest, name in re.findall(r"^\s+([0-9a-f]{64})  (\S+)$", PROVENANCE, re.M)
)


def test_provenance_lists_every_file() -> None:
    stored = {
        p.relative_to(DATA).as_posix().removesuffix(".gz")
        for p in DATA.rglob("*")
        if p.is_file() and p.name != "PROVENANCE.md"
    }
    assert stored == set(DIGESTS)
    assert "argoproj/argo-workflows" in PROVENANCE
    assert "16a52d67daf2f4a8a76fa8bec02a76a46aa46257" in PROVENANCE


def test_files_are_byte_identical_to_upstream() -> None:
    for name, digest in DIGESTS.items():
        stored = name + ".gz" if (DATA / f"{name}.gz").exists() else name
        assert hashlib.sha256(read_data(stored)).hexdigest() == digest, name
