"""Help as kubectl sets it out: plain text, every option's name, description and default whole, no
type placeholders (`<str>`, `TEXT`, `<bool>`); usage errors as plain lines too.

typer builds each command from its function; the root command (`KeybrakeGroup`, the `cls` of the
`keybrake` app) sets out every command under it, once, when it is made.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["KeybrakeGroup"]

# A type typer writes after an argument's name (`key_id <str>`, `paths... <list[Path]>`); an
# option's is blanked where it is made (`_set_out`).
_TYPE = re.compile(r" <[^<>]*>")
# Kept on one line where it fits: what the variable and the default are.
_SHOWN = re.compile(r"(?:env var|default): \S+")


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` where its words allow, broken only at spaces: click
    breaks after hyphens (`--max-` / `total-usd-cap`) and cuts a word longer than a line."""
    held = _SHOWN.sub(lambda m: m[0].replace(" ", "\u00a0") if len(m[0]) < width else m[0], text)
    lines = textwrap.wrap(held, width, break_long_words=False, break_on_hyphens=False)
    return [line.replace("\u00a0", " ") for line in lines] or [""]


class HelpFormatter(typer.Context.formatter_class):  # type: ignore[misc,valid-type]
    """click's layout, wrapping only at spaces: an option, a path, a URL or a default is never
    broken across two lines, nor cut."""

    def write_text(self, text: str) -> None:
        """Paragraphs (blank lines apart) wrapped, as click does; one whose first line is click's
        `\\b` as it is written."""
        indent = " " * self.current_indent
        shown = []
        for paragraph in re.split(r"\n\s*\n", text.strip("\n")):
            lines = paragraph.splitlines()
            if lines[0].strip() == "\b":
                shown.append("\n".join(indent + line for line in lines[1:]))
                continue
            lead = indent + " " * (len(lines[0]) - len(lines[0].lstrip()))
            words = " ".join(line.strip() for line in lines)
            shown.append("\n".join(lead + line for line in _wrap(words, self.width - len(lead))))
        self.write("\n\n".join(shown) + "\n")

    def write_dl(
        self, rows: Sequence[tuple[str, str]], col_max: int = 30, col_spacing: int = 2
    ) -> None:
        """Terms (options, commands) and what they do, as click sets them out."""
        rows = [(_TYPE.sub("", term).rstrip(), text) for term, text in rows]
        first = min(max(len(term) for term, _ in rows), col_max) + col_spacing
        hanging = " " * (self.current_indent + first)
        for term, text in rows:
            self.write(" " * self.current_indent + term)
            if not text:
                self.write("\n")
                continue
            fits = len(term) <= first - col_spacing
            self.write(" " * (first - len(term)) if fits else "\n" + hanging)
            lines = _wrap(text, max(self.width - first - 2, 10))
            self.write("\n".join([lines[0], *(hanging + line for line in lines[1:])]) + "\n")


class _Context(typer.Context):
    formatter_class = HelpFormatter


class KeybrakeGroup(TyperGroup):
    """The `keybrake` command; it sets out the help of every command under it."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        _set_out(self)


def _set_out(command: object) -> None:
    """Plain help (in HelpFormatter's lines) for `command` and every command under it."""
    if not isinstance(command, TyperCommand | TyperGroup):
        return
    command.rich_markup_mode = None  # click's plain help and errors, not rich's boxes
    command.context_class = _Context
    # The options' types (`<str>`, `TEXT`, `<bool>`) are no help: their descriptions say what to
    # give (an argument's type is left out where it is written, in HelpFormatter).
    for param in [*command.params, command.get_help_option(_Context(command))]:
        if isinstance(param, typer.core.TyperOption):
            param.metavar = ""
    if command.help and not command.short_help:  # the commands' list: a whole first sentence
        first = " ".join(command.help.split("\n\n")[0].split())
        command.short_help = re.split(r"(?<=\.)\s", first, maxsplit=1)[0]
    for sub in getattr(command, "commands", {}).values():
        _set_out(sub)
