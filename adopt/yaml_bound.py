"""YAML read with its aliases' expansion bounded, for `keybrake lint` and `keybrake wrap`.

An alias (`*name`) stands for the whole node its anchor (`&name`) marks, so a few hundred bytes
of anchors, each aliasing the one before nine times, stand for billions of nodes (a "billion
laughs" file). The loaders share one object per anchor, so loading stays small; what blows up is
anything that then walks or prints the data as a tree (`str()` of a list, `json.dumps`). So the
composer counts, as it reads, the nodes every alias stands for (its anchor's node with the
aliases inside that expanded in turn), and past `ALIAS_NODE_LIMIT` for a file it stops with
`TooManyAliasNodes`, before anything is built from the nodes.

The limit is per file (all its documents), and above anything Argo can run: Kubernetes stores an
object of at most 1.5 MiB (etcd's default request size), kubectl and `argo submit` send it with
its aliases expanded, and a node takes at least 2 bytes of JSON, so no document Argo accepts
expands to more than ~790,000 nodes. An alias to a node still being read (a recursive structure)
counts as one node: loaders share it, they never expand it."""

from __future__ import annotations

from typing import Any

import yaml
from ruamel.yaml.composer import Composer
from ruamel.yaml.events import AliasEvent

from keybrake.proxy.errors import KeybrakeError

__all__ = [
    "ALIAS_NODE_LIMIT",
    "AliasExpansion",
    "BoundedComposer",
    "TooManyAliasNodes",
    "safe_load",
]

ALIAS_NODE_LIMIT = 1_000_000


class TooManyAliasNodes(KeybrakeError):
    """A file whose aliases stand for more than `limit` nodes (a "billion laughs" file)."""

    def __init__(self, limit: int, line: int) -> None:
        self.limit = limit
        self.line = line  # 1-based: the alias that went past the limit
        super().__init__(
            f"its YAML aliases expand to more than {limit:,} nodes (line {line}): "
            'refused, as an alias bomb ("billion laughs") would exhaust memory'
        )


class AliasExpansion:
    """The nodes a file's aliases stand for, counted while its documents are composed.

    `begin` before composing a node (or alias), `end` after; each open node sums the sizes of
    its children, and an anchored node keeps its size for the aliases to it."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = ALIAS_NODE_LIMIT if limit is None else limit
        self.expanded = 0  # nodes the file's aliases stand for, all its documents so far
        self._open: list[int] = [0]  # per node being composed: its children's sizes so far
        self._sizes: dict[int, int] = {}  # per anchored node (by id): its size, aliases expanded

    def document(self) -> None:
        """A new document: anchors are the document's own."""
        self._open = [0]
        self._sizes = {}

    def begin(self, alias: bool) -> None:
        if not alias:
            self._open.append(0)

    def end(self, node: object, alias: bool, anchor: object, line: int) -> None:
        if alias:
            # An anchor whose node is still being composed (an alias inside it) has no size
            # yet: the loader shares that object, a back reference, one node.
            size = self._sizes.get(id(node), 1)
            self.expanded += size
            if self.expanded > self.limit:
                raise TooManyAliasNodes(self.limit, line + 1)
        else:
            size = 1 + self._open.pop()
            if anchor is not None:
                self._sizes[id(node)] = size  # the node lives as long as the document's anchors
        self._open[-1] += size


class BoundedComposer(Composer):
    """ruamel.yaml's composer, counting what aliases stand for (its pure-Python parser: the
    round-trip loader always has it)."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.expansion = AliasExpansion()

    def compose_document(self) -> Any:
        self.expansion.document()
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        alias = isinstance(event, AliasEvent)
        self.expansion.begin(alias)
        node = super().compose_node(parent, index)
        self.expansion.end(node, alias, event.anchor, event.start_mark.line)
        return node


class _BoundedSafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (pure Python), counting what aliases stand for."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.expansion = AliasExpansion()

    def compose_document(self) -> yaml.Node | None:
        self.expansion.document()
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        alias = self.check_event(yaml.AliasEvent)
        event = self.current_event  # the one check_event peeked at
        self.expansion.begin(alias)
        node = super().compose_node(parent, index)
        self.expansion.end(node, alias, event.anchor, event.start_mark.line)
        return node


def safe_load(text: str) -> Any:
    """`yaml.safe_load`, its aliases' expansion bounded: raises `TooManyAliasNodes` past the
    limit (and `yaml.YAMLError` on YAML that is not valid, as `yaml.safe_load` does)."""
    loader = _BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
