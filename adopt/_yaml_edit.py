"""Changes to a YAML file made in its text, at the places its parser read each node from.

`keybrake wrap` loads a file with ruamel.yaml's round-trip loader (the data it reasons about)
and changes that data through a `SourceEditor`, which also records, for each change, the span of
the original text it replaces or the place it inserts at, with the text to put there. The file
written is the original text with those spans replaced: every byte outside them stays as it was,
whatever the indentation (mixed in one file), flow collections, comments, block scalars, anchors
or line endings. What is inserted follows the style of the collection it goes into (block or
flow, the columns of its keys or dashes) and, within it, the file's own indentation.

What the loader records: each mapping's and sequence's node (its marks: where it starts and
ends), and each alias's span (an alias stands for the node it names, whose marks are those of
the anchor's place). A change to data read through an alias is made at the anchor, as ruamel's
own round trip would write it; `replace` with a copy is how a caller gives one alias its own
value.

Data created by the caller (a new template, a copy) has no place in the text: it is written out
whole where it is inserted, as it is when the edits are applied (changes made to it after its
insertion included).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from keybrake.adopt.workflows import yaml_round_trip
from keybrake.adopt.yaml_bound import BoundedComposer
from keybrake.proxy.errors import KeybrakeError

__all__ = ["Edit", "EditConflict", "SourceEditor", "fresh", "positioned_yaml"]


class _Composer(BoundedComposer):
    """Records each alias's span in the text, by its parent node and place (key node or index)."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.aliases: dict[tuple[int, int], tuple[Node, int, int]] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if isinstance(event, AliasEvent) and parent is not None and index is not None:
            slot = index if isinstance(index, int) else id(index)
            self.aliases[(id(parent), slot)] = (
                parent,
                event.start_mark.index,
                event.end_mark.index,
            )
        return super().compose_node(parent, index)


class _Constructor(RoundTripConstructor):
    """Records the node each mapping and sequence was built from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nodes: dict[int, tuple[Any, Node]] = {}

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        data = super().construct_object(node, deep)
        if isinstance(data, CommentedMap | CommentedSeq) and id(data) not in self.nodes:
            self.nodes[id(data)] = (data, node)  # the data kept alive: its id stays its own
        return data


def positioned_yaml() -> YAML:
    """A `yaml_round_trip()` whose loading records where each node is (for `SourceEditor`)."""
    yaml = yaml_round_trip()
    yaml.Composer = _Composer
    yaml.Constructor = _Constructor
    return yaml


class EditConflict(KeybrakeError):
    """A change that cannot be made in the text: two changes to one place, a key that comes from
    a merge key (`<<`) rather than the mapping's own text, or a shape the editor did not foresee
    (`keybrake wrap` refuses the file, naming it)."""


@dataclass(slots=True)
class Edit:
    """The original text's span [start, end) replaced by `text` (start == end: an insertion)."""

    start: int
    end: int
    text: str


@dataclass(slots=True)
class _Pending:
    start: int
    end: int
    render: Callable[[], str]
    order: int


_BLOCK_SCALAR = ("|", ">")


class SourceEditor:
    """Changes the loaded data and records each change as an edit of the original text.

    `text` is what `loader` (a `positioned_yaml()`) loaded; `indent` the file's own
    (mapping, sequence, offset) indentation, used inside whatever is written out whole."""

    def __init__(self, text: str, loader: YAML, indent: tuple[int, int, int]) -> None:
        self.text = text
        constructor = loader.constructor
        composer = loader.composer
        assert isinstance(constructor, _Constructor) and isinstance(composer, _Composer)
        self._nodes = constructor.nodes
        self._aliases = composer.aliases
        self._pending: list[_Pending] = []
        self._replaced: dict[tuple[int, int], _Pending] = {}
        self._ended = False  # a line break added after a last line that had none
        # Per sequence changed: which of its items are the text's own (False: inserted since).
        self._origin: dict[int, list[bool]] = {}
        self._new_pairs: dict[tuple[int, str], _Pending] = {}
        self._newline = "\r\n" if "\r\n" in text else "\n"
        mapping, sequence, offset = indent
        self._indent = mapping
        self._offset = offset
        self._block = yaml_round_trip()
        self._block.indent(mapping=mapping, sequence=max(sequence, offset + 2), offset=offset)
        self._flow = yaml_round_trip()
        self._flow.default_flow_style = True
        for dumper in (self._block, self._flow):
            # `key: null` and `key: ~` stay readable values, never an empty `key:`.
            dumper.representer.add_representer(
                type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
            )

    # What the text holds -----------------------------------------------------------------

    def node(self, data: Any) -> Node | None:
        """The node `data` was loaded from; None for data made since."""
        found = self._nodes.get(id(data))
        return found[1] if found is not None and found[0] is data else None

    def _alias(self, parent: Node, slot: Node | int) -> tuple[int, int] | None:
        found = self._aliases.get((id(parent), slot if isinstance(slot, int) else id(slot)))
        return (found[1], found[2]) if found is not None and found[0] is parent else None

    @staticmethod
    def _pair(node: MappingNode, key: Any) -> tuple[Node, Node] | None:
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.value == str(key):
                return key_node, value_node
        return None

    def _after_colon(self, key_node: Node) -> int:
        at = key_node.end_mark.index
        while at < len(self.text) and self.text[at] in " \t":
            at += 1
        return at + 1 if self.text.startswith(":", at) else int(key_node.end_mark.index)

    def _end(self, node: Node) -> int | None:
        """Where the node's own text ends (None: an empty scalar, which has none)."""
        if isinstance(node, ScalarNode):
            if node.value == "" and node.style is None and node.start_mark == node.end_mark:
                return None
            end: int = node.end_mark.index
            if node.style in _BLOCK_SCALAR:
                header = self.text[node.start_mark.index : end].split("\n", 1)[0]
                if "+" not in header:  # trailing blank lines are no part of it: stop at its text
                    while end > node.start_mark.index and self.text[end - 1] in " \t\r\n":
                        end -= 1
            return end
        if _flow(node):
            return int(node.end_mark.index)
        if isinstance(node, MappingNode):
            key_node, value_node = node.value[-1]
            return self._value_end(node, key_node, value_node)
        assert isinstance(node, SequenceNode)
        return self._value_end(node, len(node.value) - 1, node.value[-1])

    def _value_end(self, parent: Node, slot: Node | int, value: Node) -> int:
        alias = self._alias(parent, slot)
        if alias is not None:
            return alias[1]
        end = self._end(value)
        if end is not None:
            return end
        if isinstance(slot, Node):
            return self._after_colon(slot)
        return self._dash(parent, slot) + 1

    def _value_start(self, parent: Node, slot: Node | int, value: Node) -> int:
        alias = self._alias(parent, slot)
        return alias[0] if alias is not None else int(value.start_mark.index)

    def _skip(self, at: int) -> int:
        """The next token at or after `at`: blanks, comments and node properties skipped."""
        text = self.text
        while at < len(text):
            char = text[at]
            if char in " \t\r\n":
                at += 1
            elif char == "#":
                newline = text.find("\n", at)
                at = len(text) if newline < 0 else newline
            elif char in "&!" and (at == 0 or text[at - 1] in " \t\r\n"):
                while at < len(text) and text[at] not in " \t\r\n":
                    at += 1
            else:
                return at
        return at

    def _dash(self, node: Node, index: int) -> int:
        """Where the `-` of a block sequence's item is."""
        if index == 0:
            at = self._skip(node.start_mark.index)
        else:
            previous = node.value[index - 1]
            at = self._skip(self._value_end(node, index - 1, previous))
        if not self.text.startswith("-", at):
            raise EditConflict(f"line {self._line(at)}: no `-` where a sequence item starts")
        return at

    def _column(self, at: int) -> int:
        return at - (self.text.rfind("\n", 0, at) + 1)

    def _line(self, at: int) -> int:
        return self.text.count("\n", 0, at) + 1

    def _line_after(self, at: int) -> int:
        """The start of the line after the one `at` is on (`at` itself at a line's start)."""
        if at == 0 or self.text[at - 1] == "\n":
            return at
        newline = self.text.find("\n", at)
        return len(self.text) if newline < 0 else newline + 1

    def _item_columns(self, node: SequenceNode, index: int) -> tuple[int, int]:
        """(dash column, content column) of a block sequence's item."""
        dash = self._dash(node, index)
        start = self._value_start(node, index, node.value[index])
        column = self._column(dash)
        same_line = "\n" not in self.text[dash:start]
        return column, (self._column(start) if same_line else column + 2)

    # Writing data out ----------------------------------------------------------------------

    def _dump(self, yaml: YAML, data: Any) -> str:
        out = io.StringIO()
        yaml.dump(data, out)
        return out.getvalue()

    def flow(self, value: Any) -> str:
        """`value` in flow style, on one line: valid in block and flow context alike."""
        if isinstance(value, dict):
            pairs = (f"{self.flow(key)}: {self.flow(item)}" for key, item in value.items())
            return "{" + ", ".join(pairs) + "}"
        if isinstance(value, list):
            return "[" + ", ".join(self.flow(item) for item in value) + "]"
        text = self._dump(self._flow, CommentedMap(k=value))  # `{k: <the scalar>}`
        assert text.startswith("{k: ") and text.endswith("}\n"), text
        return text[4:-2]

    def _block_lines(self, value: Any) -> list[str]:
        """A mapping or sequence in block style, its lines at column 0."""
        lines = self._dump(self._block, fresh(value)).splitlines()
        margin = min(len(line) - len(line.lstrip(" ")) for line in lines if line.strip())
        return [line[margin:] for line in lines]

    def _item_text(self, value: Any, dash: int, content: int, flow: bool) -> list[str]:
        """A block sequence's new item: its lines, the first starting with its `-`."""
        if flow or not isinstance(value, CommentedMap | CommentedSeq) or not value:
            lines = [self.flow(value)]
        else:
            lines = self._block_lines(value)
        pad = " " * max(content - dash - 1, 1)
        return ["-" + pad + lines[0], *(" " * content + line if line else "" for line in lines[1:])]

    @staticmethod
    def _prefixed(lines: list[str], column: int) -> list[str]:
        """An item's lines (its first at column 0) placed with its `-` at `column`."""
        return [" " * column + lines[0], *lines[1:]]

    def _add(self, start: int, end: int, render: Callable[[], str]) -> _Pending:
        pending = _Pending(start, end, render, len(self._pending))
        self._pending.append(pending)
        return pending

    def _replace_span(self, start: int, end: int, render: Callable[[], str]) -> None:
        """Replace [start, end), once: a later change of the same value renders anew."""
        known = self._replaced.get((start, end))
        if known is not None:
            known.render = render
        else:
            self._replaced[(start, end)] = self._add(start, end, render)

    def _nl(self, text: str) -> str:
        return text.replace("\n", self._newline) if self._newline != "\n" else text

    def _node_index(self, seq: CommentedSeq, node: SequenceNode, index: int) -> int | None:
        """The node of the item at `index` of the data (None: an item inserted since)."""
        origin = self._origin.setdefault(id(seq), [True] * len(node.value))
        return origin[:index].count(True) if origin[index] else None

    # Changes -------------------------------------------------------------------------------

    def set(self, mapping: CommentedMap, key: str, value: Any, after: str | None = None) -> None:
        """`mapping[key] = value`: its value replaced where it is one of the mapping's own keys,
        else a new key (after the key `after` when given and there, else last)."""
        node = self.node(mapping)
        pair = self._pair(node, key) if isinstance(node, MappingNode) else None
        if key in mapping and (mapping[key] is value or _same(mapping[key], value)):
            return  # as it is written (`"Always"` stays quoted)
        if pair is None and key not in mapping and after in mapping:
            mapping.insert(list(mapping).index(after) + 1, key, value)
        else:
            mapping[key] = value
        if not isinstance(node, MappingNode):
            return  # new data: written out whole where it is inserted
        if pair is not None:
            self._replace_value(node, pair[0], pair[1], lambda: mapping[key])
        elif (id(node), key) not in self._new_pairs:  # else written as it is when applied
            self._new_pairs[(id(node), key)] = self._insert_pair(
                node, key, lambda: mapping[key], after
            )

    def replace_pair(self, mapping: CommentedMap, old: str, key: str, value: Any) -> None:
        """The key `old` and its value become `key: value` (a scalar), in the same place."""
        index = list(mapping).index(old)
        del mapping[old]
        mapping.insert(index, key, value)
        node = self.node(mapping)
        if not isinstance(node, MappingNode):
            return
        pair = self._pair(node, old)
        if pair is None:
            raise EditConflict(
                f"line {self._line(node.start_mark.index)}: {old!r} comes from a merge key "
                "(`<<`), not the mapping's own text"
            )
        start = pair[0].start_mark.index
        end = self._value_end(node, pair[0], pair[1])
        self._replace_span(start, end, lambda: f"{key}: {self.flow(mapping[key])}")

    def replace(self, parent: CommentedMap | CommentedSeq, slot: Any, value: Any) -> None:
        """`parent[slot] = value` for an existing key or item (a copy in place of an alias)."""
        node = self.node(parent)
        if isinstance(node, MappingNode):
            pair = self._pair(node, slot)
            if pair is None:
                raise EditConflict(f"{slot!r} comes from a merge key (`<<`)")
            self._replace_value(node, pair[0], pair[1], lambda: value)
        elif isinstance(node, SequenceNode) and isinstance(parent, CommentedSeq):
            index = self._node_index(parent, node, slot)
            if index is None:
                raise EditConflict(f"item {slot} was inserted by this change")
            self._replace_item(node, index, lambda: value)
        parent[slot] = value

    def aliased(self, parent: Any, slot: Any) -> bool:
        """Whether `parent[slot]` is written as an alias (`*name`) there."""
        node = self.node(parent)
        if isinstance(node, MappingNode):
            pair = self._pair(node, slot)
            return pair is not None and self._alias(node, pair[0]) is not None
        if isinstance(node, SequenceNode) and isinstance(slot, int):
            index = self._node_index(parent, node, slot)
            return index is not None and self._alias(node, index) is not None
        return False

    def insert(self, seq: CommentedSeq, index: int, item: Any) -> None:
        """`seq.insert(index, item)` before an existing item."""
        node = self.node(seq)
        if not isinstance(node, SequenceNode):
            seq.insert(index, item)
            return
        found = self._node_index(seq, node, index)
        if found is None:
            raise EditConflict(f"an insertion before item {index}, itself inserted")
        self._origin[id(seq)].insert(index, False)
        seq.insert(index, item)
        index = found
        before = node.value[index]
        if node.flow_style:
            at = self._value_start(node, index, before)
            self._add(at, at, lambda: self.flow(item) + ", ")
            return
        dash = self._dash(node, index)
        column, content = self._item_columns(node, index)
        flow = isinstance(before, MappingNode) and bool(before.flow_style)

        line_start = dash - column
        if self.text[line_start:dash].strip(" ") == "":
            # Whole lines before the item's own: those stay as they were.
            self._insert_lines(
                line_start,
                lambda: self._prefixed(self._item_text(item, column, content, flow), column),
            )
            return

        def render() -> str:  # after `- ` of an outer sequence: the item's line split in two
            lines = self._item_text(item, column, content, flow)
            return "\n".join(lines) + "\n" + " " * column

        self._add(dash, dash, render)

    def append(self, seq: CommentedSeq, item: Any) -> None:
        """`seq.append(item)`."""
        seq.append(item)
        node = self.node(seq)
        if not isinstance(node, SequenceNode):
            return
        self._origin.setdefault(id(seq), [True] * len(node.value)).append(False)
        if not node.value:  # `[]`
            at = node.start_mark.index
            at = self.text.index("[", at) + 1
            self._add(at, at, lambda: self.flow(item))
            return
        last = len(node.value) - 1
        end = self._value_end(node, last, node.value[last])
        if node.flow_style:
            self._add(end, end, lambda: ", " + self.flow(item))
            return
        column, content = self._item_columns(node, 0)
        flow = isinstance(node.value[last], MappingNode) and bool(node.value[last].flow_style)
        self._insert_lines(
            self._line_after(end),
            lambda: self._prefixed(self._item_text(item, column, content, flow), column),
        )

    # Changes, in the text ------------------------------------------------------------------

    def _insert_lines(self, at: int, lines: Callable[[], list[str]]) -> _Pending:
        """Whole lines inserted at the start of a line (at the end of a file without a final
        line break: after one)."""
        lead = ""
        if at == len(self.text) and self.text and not self.text.endswith("\n"):
            lead = "" if self._ended else "\n"  # the first insertion there ends the last line
            self._ended = True
        return self._add(at, at, lambda: lead + "".join(line + "\n" for line in lines()))

    def _insert_pair(
        self, node: MappingNode, key: str, value: Callable[[], Any], after: str | None
    ) -> _Pending:
        if not node.value:  # `{}`
            at = self.text.index("{", node.start_mark.index) + 1
            return self._add(at, at, lambda: f"{key}: {self.flow(value())}")
        pair = self._pair(node, after) if after is not None else None
        key_node, value_node = pair or node.value[-1]
        end = self._value_end(node, key_node, value_node)
        if node.flow_style:
            return self._add(end, end, lambda: f", {key}: {self.flow(value())}")
        column = self._column(node.value[0][0].start_mark.index)

        def lines() -> list[str]:
            rendered = self._block_lines(CommentedMap([(key, value())]))
            return [" " * column + line if line else "" for line in rendered]

        return self._insert_lines(self._line_after(end), lines)

    def _replace_value(
        self, node: MappingNode, key_node: Node, value_node: Node, value: Callable[[], Any]
    ) -> None:
        aliased = self._alias(node, key_node) is not None
        start = self._value_start(node, key_node, value_node)
        end = self._value_end(node, key_node, value_node)
        colon = self._after_colon(key_node)
        empty = not aliased and self._end(value_node) is None
        if empty:
            start = end = colon
        collection = (
            not aliased and not empty and isinstance(value_node, MappingNode | SequenceNode)
        )
        anchor = f"&{value_node.anchor} " if not aliased and value_node.anchor else ""
        new = value()
        inline = not (isinstance(new, CommentedMap | CommentedSeq) and new) or _flow_data(new)
        if inline or node.flow_style or anchor:
            self._replace_span(
                start, end, lambda: (" " if empty else "") + anchor + self.flow(value())
            )
        elif collection and _flow(value_node):
            self._replace_span(start, end, lambda: self.flow(value()))  # flow stays flow
        elif collection:
            # A block replaced in place: its first line where the old one's was, the rest at the
            # same column.
            column = self._column(start)

            def render() -> str:
                lines = self._block_lines(value())
                return "\n".join([lines[0], *(" " * column + x if x else "" for x in lines[1:])])

            self._replace_span(start, end, render)
        else:
            # A scalar or an alias becomes a block: on the lines below `key:`, in the file's
            # indentation.
            column = self._column(key_node.start_mark.index) + (
                self._offset if isinstance(new, CommentedSeq) else self._indent
            )

            def below() -> str:
                lines = self._block_lines(value())
                return "".join("\n" + (" " * column + x if x else "") for x in lines)

            self._replace_span(colon, end, below)

    def _replace_item(self, node: SequenceNode, index: int, value: Callable[[], Any]) -> None:
        item = node.value[index]
        start = self._value_start(node, index, item)
        end = self._value_end(node, index, item)
        if node.flow_style:
            self._replace_span(start, end, lambda: self.flow(value()))
            return
        column = self._column(start)

        def render() -> str:
            new = value()
            if not isinstance(new, CommentedMap | CommentedSeq) or not new:
                return self.flow(new)
            lines = self._block_lines(new)
            return "\n".join([lines[0], *(" " * column + x if x else "" for x in lines[1:])])

        self._replace_span(start, end, render)

    # The result ----------------------------------------------------------------------------

    def edits(self) -> list[Edit]:
        """Every change, as spans of the original text, in order; raises `EditConflict` when two
        overlap."""
        ordered = sorted(self._pending, key=lambda p: (p.start, p.end > p.start, p.order))
        edits: list[Edit] = []
        cursor = 0
        for pending in ordered:
            if pending.start < cursor:
                raise EditConflict(
                    f"line {self._line(pending.start)}: two changes to the same place"
                )
            edits.append(Edit(pending.start, pending.end, self._nl(pending.render())))
            cursor = max(cursor, pending.end)
        return edits

    def apply(self, edits: list[Edit]) -> str:
        out: list[str] = []
        cursor = 0
        for edit in edits:
            out.append(self.text[cursor : edit.start])
            out.append(edit.text)
            cursor = edit.end
        out.append(self.text[cursor:])
        return "".join(out)


def _flow(node: Node) -> bool:
    """A mapping or sequence written in flow style (`{…}`, `[…]`)."""
    return isinstance(node, MappingNode | SequenceNode) and bool(node.flow_style)


def _flow_data(value: Any) -> bool:
    """A mapping or sequence to be written in flow style (a copy of one written so)."""
    return isinstance(value, CommentedMap | CommentedSeq) and bool(value.fa.flow_style())


def _same(old: Any, new: Any) -> bool:
    """A scalar already written as the value asked for (so `"Always"` stays quoted)."""
    if isinstance(old, bool) or isinstance(new, bool):
        return old is new
    scalar = str | int | float
    return isinstance(old, scalar) and isinstance(new, scalar) and old == new


def fresh(value: Any) -> Any:
    """A copy of loaded or made data with nothing of the file attached (comments, anchors,
    positions), each collection its own object (no alias made up when written), flow style
    kept."""
    copy: CommentedMap | CommentedSeq
    if isinstance(value, CommentedMap):
        copy = CommentedMap((key, fresh(item)) for key, item in value.items())
    elif isinstance(value, CommentedSeq):
        copy = CommentedSeq(fresh(item) for item in value)
    elif isinstance(value, dict):
        return CommentedMap((key, fresh(item)) for key, item in value.items())
    elif isinstance(value, list):
        return CommentedSeq(fresh(item) for item in value)
    else:
        return value
    if value.fa.flow_style():
        copy.fa.set_flow_style()
    return copy
