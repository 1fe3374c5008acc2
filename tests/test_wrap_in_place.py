"""`keybrake wrap` changes only what it must: every byte of the file outside what it inserts or
rewrites stays as it was, whatever the file's indentation (mixed in one file), flow collections,
comments, block scalars, anchors and aliases, line endings or byte-order mark.

Checked on every file wrap accepts among its own fixtures (tests/adopt/wrap_text/, written to be
awkward), the workflows of tests/adopt/, and the lint corpus (tests/corpus/lint/, public
workflow files and synthesised ones): removing wrap's edits from its output gives back the input;
every line the diff (difflib) shows removed or changed is one an edit touches; each rewritten
span is one wrap means to rewrite; and the output means what the same file written out as JSON
(no styles, no aliases) means once wrapped. The fixtures' changed lines are listed by hand too.
"""

from __future__ import annotations

import difflib
import io
import json
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from keybrake.adopt.wrap import WrapError, WrapOptions, Wrapped, wrap_text

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "adopt" / "wrap_text"
OPTIONS = WrapOptions(budget_usd=Decimal("50"))
FILES = sorted(
    [
        *FIXTURES.glob("*.yaml"),
        *(TESTS / "adopt" / "workflows").glob("*.yaml"),
        *(TESTS / "adopt" / "edge" / "wrap").glob("*.yaml"),
        *(p for p in (TESTS / "corpus" / "lint").rglob("*.y*ml") if p.name != "labels.yaml"),
    ]
)
# What wrap rewrites in place (all else it inserts): a value of one of these keys, an env
# entry's `valueFrom` (a credential's, or a base URL's), or an alias it writes out.
REWRITTEN_KEYS = re.compile(r"\b(entrypoint|onExit|exit|retryPolicy|expression|valueFrom|value):")


def read(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # as it is: CRLF and a byte-order mark kept


def wrapped_or_none(text: str, options: WrapOptions = OPTIONS) -> Wrapped | None:
    try:
        wrapped = wrap_text(text, options)
    except WrapError:
        return None
    return wrapped if wrapped.changed else None


def line_of(text: str, at: int) -> int:
    """0-based line of a position of the text."""
    return text.count("\n", 0, at)


def unwrapped(text: str, wrapped: Wrapped) -> str:
    """The output with each of wrap's edits taken out again, checking that everything between
    them is the input's own text."""
    out, back, cursor, at = wrapped.text, [], 0, 0
    for start, end, new in wrapped.edits:
        kept = text[cursor:start]
        assert out[at : at + len(kept)] == kept, (start, out[at : at + len(kept) + 40])
        at += len(kept)
        assert out[at : at + len(new)] == new
        at += len(new)
        back += [kept, text[start:end]]
        cursor = end
    assert out[at:] == text[cursor:]
    return "".join([*back, text[cursor:]])


def touched_lines(text: str, wrapped: Wrapped) -> set[int]:
    """Input lines an edit rewrites, or inserts into (an insertion at a line's start touches
    none: whole lines go in before it)."""
    lines: set[int] = set()
    for start, end, _new in wrapped.edits:
        if end > start:
            lines |= set(range(line_of(text, start), line_of(text, end - 1) + 1))
        elif start > 0 and text[start - 1] != "\n":
            lines.add(line_of(text, start))
    return lines


def changed_lines(before: str, after: str) -> set[int]:
    """Input lines (0-based) difflib shows removed or changed, less those it shows added back
    elsewhere (its alignment of like lines, such as a new env entry's `valueFrom:` before the
    old one's, shows some kept lines as removed and added)."""
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    opcodes = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    added = Counter(line for _tag, _i1, _i2, j1, j2 in opcodes for line in b[j1:j2])
    changed = set()
    for _tag, i1, i2, _j1, _j2 in opcodes:
        for line in range(i1, i2):
            if added[a[line]]:
                added[a[line]] -= 1
            else:
                changed.add(line)
    return changed


def documents(text: str) -> list[Any]:
    return list(YAML(typ="safe").load_all(io.StringIO(text)))


# The fixtures once more with a refusal exit code (a retry expression written or joined).
REFUSAL_CODE = WrapOptions(budget_usd=Decimal("50"), refusal_exit_code=77, expires_in="3h")
CASES = [
    *((path, OPTIONS) for path in FILES),
    *((path, REFUSAL_CODE) for path in FILES if path.parent == FIXTURES),
]


# The files wrap rewrites with the default options; the others it refuses or leaves alone (a
# workflow without a proxied credential, one already wrapped). Pinned, so that the test below,
# which checks only what is rewritten, cannot pass by wrap rewriting nothing.
REWRITTEN = {
    "adopt/edge/wrap/anchors.yaml",
    "adopt/edge/wrap/backoff.yaml",
    "adopt/edge/wrap/baseurl.yaml",
    "adopt/edge/wrap/both_exit.yaml",
    "adopt/edge/wrap/crlf.yaml",
    "adopt/edge/wrap/cset.yaml",
    "adopt/edge/wrap/deep.yaml",
    "adopt/edge/wrap/exit_inputs.yaml",
    "adopt/edge/wrap/gotmpl.yaml",
    "adopt/edge/wrap/hyphen.yaml",
    "adopt/edge/wrap/indent4.yaml",
    "adopt/edge/wrap/limit0.yaml",
    "adopt/edge/wrap/twilio.yaml",
    "adopt/workflows/before-billing-agent.yaml",
    "adopt/workflows/nested-fanout.yaml",
    "adopt/workflows/silenced.yaml",
    "adopt/workflows/single-pod-default-retry.yaml",
    "adopt/workflows/steps-bounded-onerror.yaml",
    "adopt/wrap_text/crlf-bom.yaml",
    "adopt/wrap_text/cron-mixed.yaml",
    "adopt/wrap_text/entry-alias.yaml",
    "adopt/wrap_text/flow.yaml",
    "adopt/wrap_text/flowish.yaml",
    "adopt/wrap_text/mixed-indent.yaml",
    "adopt/wrap_text/shared-env.yaml",
    "adopt/wrap_text/two-vendors.yaml",
    "corpus/lint/synthesised/syn-cron-fanout.yaml",
    "corpus/lint/synthesised/syn-cron-workflow-template-ref.yaml",
    "corpus/lint/synthesised/syn-fanout-shapes.yaml",
    "corpus/lint/synthesised/syn-resend-cron.yaml",
    "corpus/lint/synthesised/syn-retry-shapes.yaml",
    "corpus/lint/synthesised/syn-stripe-fanout-retry.yaml",
}


def test_wrap_rewrites_the_files_it_should() -> None:
    rewritten = {
        str(path.relative_to(TESTS))
        for path in FILES
        if wrapped_or_none(read(path), OPTIONS) is not None
    }
    assert rewritten == REWRITTEN


@pytest.mark.parametrize(
    ("path", "options"),
    CASES,
    ids=[str(p.relative_to(TESTS)) + ("" if o is OPTIONS else " refusal-code") for p, o in CASES],
)
def test_only_what_wrap_rewrites_changes(path: Path, options: WrapOptions) -> None:
    text = read(path)
    wrapped = wrapped_or_none(text, options)
    if wrapped is None:
        return  # refused or nothing to do: nothing written
    assert unwrapped(text, wrapped) == text
    touched = touched_lines(text, wrapped)
    assert changed_lines(text, wrapped.text) <= touched
    lines = text.splitlines()
    for start, end, _new in wrapped.edits:
        if end == start:
            continue
        span = text[start:end]
        assert span.lstrip().startswith("*") or REWRITTEN_KEYS.search(
            lines[line_of(text, start)] + " " + span
        ), (lines[line_of(text, start)], span)
    # The same workflow with every style and alias written out (JSON, one document each),
    # wrapped, means the same.
    plain = "---\n".join(json.dumps(d, indent=2) + "\n" for d in documents(text))
    assert documents(wrapped.text) == documents(wrap_text(plain, options).text)
    assert not wrap_text(wrapped.text, options).changed  # wrapping again changes nothing


# Per fixture, the input lines (1-based) the change rewrites: all else is inserted around them.
EXPECTED = {
    # entrypoint, the retry policy in a flow mapping, the credential's valueFrom: not one line
    # re-indented, though the file nests by 4 here, 2 there and 6 elsewhere.
    "mixed-indent.yaml": {8, 45, 51, 52, 53, 54},
    # The file is one flow mapping: the lines holding the entrypoint, the retry strategy and the
    # env list (what is inserted goes inside them).
    "flow.yaml": {2, 4, 5},
    # entrypoint, the hooks' exit handler (its comment kept), the env list (flow).
    "flowish.yaml": {5, 9, 10, 18},
    # entrypoint, the fanned-out template's valueFrom, the other template's alias (its own copy).
    "shared-env.yaml": {6, 24, 25, 32},
    "entry-alias.yaml": {8, 28, 34, 35, 36, 37, 45},
    # entrypoint, onExit (its comment kept), the retry policy, the env's flow entry and the base
    # URL's valueFrom; the folded description, multi-line plain argument and `|+` script kept.
    "cron-mixed.yaml": {15, 16, 28, 39, 41, 42},
    # The last line had no line break: it gets one. CRLF and the byte-order mark kept.
    "crlf-bom.yaml": {15, 23, 24, 25, 26},
    "two-vendors.yaml": {6, 34, 35, 43, 44, 46, 47},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_fixtures_change_only_the_lines_listed(name: str) -> None:
    text = read(FIXTURES / name)
    wrapped = wrap_text(text, OPTIONS)
    assert wrapped.changed
    assert {line + 1 for line in changed_lines(text, wrapped.text)} <= EXPECTED[name]
    # The other lines come out in order, as they were (their line endings included).
    kept = [line for n, line in enumerate(text.splitlines(True), 1) if n not in EXPECTED[name]]
    out = iter(wrapped.text.splitlines(True))
    assert all(any(line == o for o in out) for line in kept)
    assert {line + 1 for line in touched_lines(text, wrapped)} == EXPECTED[name]


def test_line_endings_and_a_byte_order_mark_are_the_files() -> None:
    text = read(FIXTURES / "crlf-bom.yaml")
    assert text.startswith("\ufeff") and "\r\n" in text and not text.endswith("\n")
    out = wrap_text(text, OPTIONS).text
    assert out.startswith("\ufeff# Windows-edited")
    assert out.count("\n") == out.count("\r\n")  # what wrap adds has the file's line endings
    assert "api_key\r\n" not in out and out.endswith("\r\n")


def test_what_is_inserted_follows_the_collection_it_goes_into() -> None:
    mixed = wrap_text(read(FIXTURES / "mixed-indent.yaml"), OPTIONS).text
    # The env entries there are `-   name:` at 16 columns: so is the new one, and the base URL.
    assert "                -   name: KEYBRAKE_VAULT_KEY_STRIPE_RAW\n" in mixed
    assert "                -   name: STRIPE_BASE_URL\n" in mixed
    # The templates are `- name:` at 4 columns (the first one's style): so are the new ones.
    assert "\n    - name: keybrake-main\n      dag:\n" in mixed
    # An env list in flow style gets flow entries.
    flowish = wrap_text(read(FIXTURES / "flowish.yaml"), OPTIONS).text
    assert 'env: [{name: KEYBRAKE_VAULT_KEY_TWILIO_RAW, valueFrom: {secretKeyRef: {name: "' in (
        flowish
    )
    # A flow entry among block ones is written as a flow entry.
    cron = wrap_text(read(FIXTURES / "cron-mixed.yaml"), OPTIONS).text
    assert "              - {name: KEYBRAKE_VAULT_KEY_STRIPE_RAW, valueFrom: {" in cron


def test_block_scalars_and_multi_line_scalars_are_kept_as_written() -> None:
    text = read(FIXTURES / "cron-mixed.yaml")
    out = wrap_text(text, OPTIONS).text
    for kept in (
        "    workflows.argoproj.io/description: >-\n      Drafts, finalises and mails each",
        "              - previous month, every\n                customer on a paid plan\n",
        '              source: |+\n                print("invoices drafted")\n\n              env:',
        '              expression: >-\n                lastRetry.status == "Error"\n',
    ):
        assert kept in text and kept in out, kept
    assert documents(out)[0]["spec"]["workflowSpec"]["templates"][1]["container"]["args"] == [
        "--period",
        "previous month, every customer on a paid plan",
    ]
