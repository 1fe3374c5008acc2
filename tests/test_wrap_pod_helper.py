"""What `keybrake wrap` tells of the pods' code: each vendor's change runs its calls through the
pod helper (keybrake.hera_workflows.keybrake_pod), how to get it, and the retry setting it goes
with."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from keybrake.adopt import wrap as adopt_wrap
from keybrake.adopt.wrap import CODE_CHANGES, WrapOptions, wrap_text
from keybrake.hera_workflows import keybrake_pod
from keybrake.hera_workflows.retry import EXIT_REFUSED

WORKFLOWS = Path(__file__).resolve().parent / "adopt" / "workflows"
SEVERAL_VENDORS = Path(__file__).resolve().parent / "adopt" / "wrap_text" / "two-vendors.yaml"


def test_each_vendors_change_runs_its_calls_through_the_helper() -> None:
    for vendor, change in CODE_CHANGES.items():
        assert "keybrake_pod.call(" in change, vendor
    # twilio's exception keeps no headers (a rate limit's Retry-After): its client is watched.
    # resend's keeps the headers, where keybrake names its code; stripe's keeps everything.
    assert "keybrake_pod.watch(client)" in CODE_CHANGES["twilio"]
    assert "watch(" not in CODE_CHANGES["resend"] and "watch(" not in CODE_CHANGES["stripe"]
    named = set(re.findall(r"keybrake_pod\.(\w+)\(", " ".join(CODE_CHANGES.values())))
    assert named == {"call", "watch"} and named <= set(keybrake_pod.__all__)


@pytest.mark.parametrize(
    ("refusal_exit_code", "advice"),
    [
        (None, "wrap with --refusal-exit-code 77 so that Argo retries"),
        (3, "wrap with --refusal-exit-code 77 (not 3) so that Argo retries"),
        (77, None),
    ],
)
def test_wrap_says_how_to_get_the_helper_and_the_retries_it_goes_with(
    refusal_exit_code: int | None, advice: str | None
) -> None:
    options = WrapOptions(budget_usd=Decimal("300"), refusal_exit_code=refusal_exit_code)
    wrapped = wrap_text((WORKFLOWS / "before-billing-agent.yaml").read_text(), options)
    (note,) = [n for n in wrapped.notes if n.startswith("keybrake_pod ")]
    assert "`python -m keybrake.hera_workflows.keybrake_pod > keybrake_pod.py`" in note
    assert f"the pod exits {EXIT_REFUSED} when keybrake refuses it" in note
    if advice is None:
        assert "--refusal-exit-code" not in note
    else:
        assert advice in note
    assert wrapped.notes.index(note) == len(wrapped.notes) - 1  # after the vendors' changes


def test_the_helper_is_told_of_once_whatever_the_vendors() -> None:
    wrapped = wrap_text(SEVERAL_VENDORS.read_text(), WrapOptions(budget_usd=Decimal("300")))
    assert wrapped.vendors == ["resend", "stripe", "twilio"]
    assert sum(1 for n in wrapped.notes if n.startswith("keybrake_pod ")) == 1
    assert sum(1 for n in wrapped.notes if "code change" in n) == 3


def test_nothing_to_wrap_says_nothing_of_the_helper() -> None:
    converted = (WORKFLOWS / "converted.yaml").read_text()
    wrapped = wrap_text(converted, WrapOptions(budget_usd=Decimal("300")))
    assert not any("keybrake_pod" in note for note in wrapped.notes)


def test_wraps_exit_code_is_the_helpers() -> None:
    assert adopt_wrap._POD_HELPER_EXIT == keybrake_pod.EXIT_REFUSED == EXIT_REFUSED
