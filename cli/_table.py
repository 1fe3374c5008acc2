"""Tables as kubectl prints them: a row a line, columns aligned, nothing cut.

Piped (stdout not a terminal), or asked for `-o wide`, a table is printed whole: each row on one
line, however long. At a terminal the table fits the terminal's width when it can without
breaking a word (a cell folds between its words); when even that cannot fit, it is printed whole,
as kubectl does, and the terminal wraps the long lines. A word, an id or a number is never split
across lines, a column never dropped.

A terminal is what the OS says is one: FORCE_COLOR or TTY_COMPATIBLE (which let rich colour a CI
log) do not make a log as narrow as a screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["Column", "Grid", "print_grid"]

GAP = 3  # spaces between columns, as kubectl's


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # right-aligned (numbers, money)


@dataclass
class Grid:
    """Columns and rows of cells: text as it is (a `Text` for a styled one); a cell may hold
    several lines."""

    columns: Sequence[Column]
    rows: list[Sequence[str | Text]] = field(default_factory=list)
    header: bool = True

    @classmethod
    def of(cls, headers: str, right: str = "") -> Grid:
        """No rows yet; columns named in `headers` (comma separated), right-aligned those named
        in `right`."""
        aligned = set(right.split(","))
        return cls([Column(header, right=header in aligned) for header in headers.split(",")])


def print_grid(grid: Grid, out: Console, *, wide: bool = False) -> None:
    """Print `grid` to `out`: whole, a row a line, unless at a terminal (and not `wide`) a
    narrower table fits it with every word whole."""
    cells = [[Text(cell) if isinstance(cell, str) else cell for cell in row] for row in grid.rows]
    if grid.header:
        cells.insert(0, [Text(c.header, style="bold") for c in grid.columns])
    natural = [max(_width(row[i]) for row in cells) for i in range(len(grid.columns))]
    room = out.width - GAP * (len(natural) - 1)
    widths = None
    if not wide and _at_terminal(out) and sum(natural) > room:
        # No column narrower than its longest word, nor than its header (kept on one line).
        least = [max(_longest_word(row[i]) for row in cells) for i in range(len(natural))]
        if grid.header:
            least = [max(n, len(c.header)) for n, c in zip(least, grid.columns, strict=True)]
        widths = _narrowed(natural, least, room)
    if widths is None:
        for line in _lines(grid.columns, cells, natural):
            out.print(line, soft_wrap=True)
        return
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, GAP, 0, 0))
    for column, width in zip(grid.columns, widths, strict=True):
        table.add_column(justify="right" if column.right else "left", width=width)
    for row in cells:
        table.add_row(*row)
    out.print(table)


def _at_terminal(out: Console) -> bool:
    try:
        return out.file.isatty()
    except ValueError:  # closed
        return False


def _width(cell: Text) -> int:
    return max(cell_len(line) for line in cell.plain.split("\n"))


def _longest_word(cell: Text) -> int:
    return max((cell_len(word) for word in cell.plain.split()), default=0)


def _narrowed(natural: list[int], least: list[int], room: int) -> list[int] | None:
    """Column widths summing to `room`, none under its longest word (`least`), taken from the
    widest columns first; None when the longest words alone do not fit."""
    if sum(least) > room:
        return None
    widths = list(natural)
    for _ in range(sum(widths) - room):
        widest = max(
            (i for i in range(len(widths)) if widths[i] > least[i]), key=lambda i: widths[i]
        )
        widths[widest] -= 1
    return widths


def _lines(columns: Sequence[Column], cells: list[list[Text]], widths: list[int]) -> list[Text]:
    """Every row whole, its cells padded to their column's width (a cell of several lines adds
    lines below, its later lines in the same column)."""
    out: list[Text] = []
    gap = " " * GAP
    for row in cells:
        split = [cell.split("\n", allow_blank=True) for cell in row]
        for n in range(max(len(parts) for parts in split)):
            line = Text()
            for i, (column, parts) in enumerate(zip(columns, split, strict=True)):
                part = parts[n] if n < len(parts) else Text()
                pad = " " * (widths[i] - part.cell_len)
                if column.right:
                    line.append(pad)
                line.append_text(part)  # its style on its own text, not on the padding
                if not column.right:
                    line.append(pad)
                if i < len(columns) - 1:
                    line.append(gap)
            line.rstrip()
            out.append(line)
    return out
