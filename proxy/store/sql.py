"""SQL written once for both backends, and the two drivers that run it.

A store operation is a generator: it yields `Query` objects (SQL with `:name` parameters) and
receives each one's result, so it holds no connection and does no I/O itself. SQLite runs it on a
thread with a `sqlite3` connection (`run_sync`); PostgreSQL runs it with `await` on an asyncpg
connection (`run_async`). What differs between the two is small and lives in a `Dialect`:
parameter style, row locks, timestamps stored as text, a list parameter, two functions.

A write operation that decides to change nothing after it has written raises `Refused`: both
drivers roll back exactly its writes (a savepoint in SQLite's shared batch transaction, the
transaction in PostgreSQL) and answer the refusal's result.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Any, TypeVar

from keybrake.proxy.decisions import CAP_HITS
from keybrake.proxy.money import format_ts, parse_ts

__all__ = [
    "CAP_HIT_SQL",
    "POSTGRES",
    "SQLITE",
    "Dialect",
    "Op",
    "Query",
    "Refused",
    "Where",
    "compiled",
    "execute",
    "execute_many",
    "inserted_id",
    "moment",
    "row",
    "rows",
    "run_async",
    "run_sync",
    "value",
]

T = TypeVar("T")


class Mode(Enum):
    ROWS = "rows"  # every row
    ROW = "row"  # the first row, or None
    VALUE = "value"  # the first column of the first row, or None
    COUNT = "count"  # rows changed
    MANY = "many"  # one statement, a parameter set after another; nothing back
    INSERTED = "inserted"  # the id of the row an INSERT made


@dataclass(frozen=True, slots=True)
class Query:
    sql: str
    params: Any  # a mapping of names to values; for MANY, a sequence of them
    mode: Mode


# What a store operation is: it yields queries, is sent each one's result, returns its answer.
Op = Generator[Query, Any, T]


def rows(sql: str, **params: Any) -> Query:
    return Query(sql, params, Mode.ROWS)


def row(sql: str, **params: Any) -> Query:
    return Query(sql, params, Mode.ROW)


def value(sql: str, **params: Any) -> Query:
    return Query(sql, params, Mode.VALUE)


def execute(sql: str, **params: Any) -> Query:
    return Query(sql, params, Mode.COUNT)


def inserted_id(sql: str, **params: Any) -> Query:
    """An INSERT into a table with an `id` key, answered with the new row's id (SQLite's
    `lastrowid`: a third of the cost of `RETURNING` there)."""
    return Query(sql, params, Mode.INSERTED)


def execute_many(sql: str, params: Iterable[Mapping[str, Any]]) -> Query:
    return Query(sql, list(params), Mode.MANY)


class Refused(Exception):
    """Raised by a write operation to undo what it wrote and answer `result` instead."""

    def __init__(self, result: Any) -> None:
        super().__init__("refused")
        self.result = result


# "Is this decision a cap hit?" as SQL on an audit row's `decision`, from the one definition.
CAP_HIT_SQL = "decision IN ({})".format(", ".join(f"'{d.value}'" for d in sorted(CAP_HITS)))


def moment(stored: Any) -> datetime:
    """A timestamp as either backend returns it: SQLite's fixed-width text, PostgreSQL's
    `timestamptz`."""
    found: datetime = parse_ts(stored) if isinstance(stored, str) else stored
    return found


@dataclass(slots=True)
class Where:
    """Conditions joined with AND, each with named parameters. A name used twice gets a suffix,
    so conditions built apart (a scope, a filter, a subquery's) can share one statement; the
    suffixes depend only on the order of `add` calls, so a query's text repeats and its
    prepared statement is reused."""

    params: dict[str, Any] = field(default_factory=dict)
    parts: list[str] = field(default_factory=list)

    def add(self, sql: str, **values: Any) -> Where:
        for name, given in values.items():
            unique, n = name, 1
            while unique in self.params:
                n += 1
                unique = f"{name}_{n}"
            if unique != name:
                sql = re.sub(rf":{name}\b", f":{unique}", sql)
            self.params[unique] = given
        self.parts.append(sql)
        return self

    def sub(self) -> Where:
        """A group of conditions of their own (a subquery's) sharing this one's parameters."""
        return Where(self.params)

    @property
    def sql(self) -> str:
        return " AND ".join(self.parts) or "1 = 1"


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the shared SQL needs to know about a backend (its parameter style: `compiled`)."""

    name: str
    # `position(haystack, needle)`: the needle's 1-based place, 0 if absent (no LIKE, whose `%`
    # and `_` in a label would match more than typed).
    find: str
    # Appended to a label in ORDER BY and comparisons: order by code point, as Python does
    # (PostgreSQL's database collation may order labels otherwise).
    binary: str
    # Whole seconds since the epoch of a timestamp column.
    epoch_seconds: Callable[[str], str]
    # `column` is one of the list parameter `:name`.
    any_of: Callable[[str, str], str]


def _sqlite_value(given: Any) -> Any:
    """A parameter as SQLite stores it: timestamps as fixed-width text, lists as JSON."""
    if isinstance(given, datetime):
        return format_ts(given)
    if isinstance(given, list | tuple):
        return json.dumps(list(given))
    return given


# What `compiled` rewrites: a `:name` parameter (not a `::` cast), and a row lock.
_NAME = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
_ROW_LOCK = re.compile(r"\s+FOR UPDATE( SKIP LOCKED)?")

# Parameters SQLite takes as they are: most of them, so the common case is one type lookup.
_AS_IS = frozenset({str, int, float, bytes, bool, type(None)})


@lru_cache(maxsize=1024)
def compiled(dialect: str, sql: str) -> tuple[str, tuple[str, ...]]:
    """The SQL as the backend takes it, and the order its parameters go in: numbered (`?NNN`,
    `$n`), bound from a tuple, which costs a fraction of binding by name. SQLite's writer holds
    the database's only write lock for a whole transaction, so row locks (`FOR UPDATE`) have
    nothing to add there."""
    if dialect == "sqlite":
        sql = _ROW_LOCK.sub("", sql)
    order: list[str] = []
    mark = "?" if dialect == "sqlite" else "$"

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in order:
            order.append(name)
        return f"{mark}{order.index(name) + 1}"

    return _NAME.sub(number, sql), tuple(order)


SQLITE = Dialect(
    name="sqlite",
    find="instr",
    binary="",  # SQLite's default collation compares bytes: UTF-8 sorts by code point
    epoch_seconds=lambda column: f"CAST(strftime('%s', substr({column}, 1, 19)) AS INTEGER)",
    any_of=lambda column, name: f"{column} IN (SELECT value FROM json_each(:{name}))",
)
POSTGRES = Dialect(
    name="postgres",
    find="strpos",
    binary=' COLLATE "C"',
    epoch_seconds=lambda column: f"floor(extract(epoch FROM {column}))::bigint",
    any_of=lambda column, name: f"{column} = ANY(:{name})",
)


# -- the drivers ------------------------------------------------------------------------------


def run_sync(conn: sqlite3.Connection, op: Op[T]) -> T:
    """Run an operation on a SQLite connection, in whatever transaction the caller holds."""
    try:
        query = next(op)
        while True:
            query = op.send(_run_sqlite(conn, query))
    except StopIteration as stop:
        result: T = stop.value
        return result


def _run_sqlite(conn: sqlite3.Connection, query: Query) -> Any:
    sql, order = compiled("sqlite", query.sql)
    if query.mode is Mode.MANY:
        conn.executemany(sql, [_sqlite_args(order, p) for p in query.params])
        return None
    args = _sqlite_args(order, query.params)
    if query.mode is Mode.COUNT:
        return conn.execute(sql, args).rowcount
    if query.mode is Mode.INSERTED:
        return conn.execute(sql, args).lastrowid
    if query.mode is Mode.VALUE:
        first = conn.execute(sql, args).fetchone()
        return None if first is None else first[0]
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row  # rows read by column name, as asyncpg's
    cursor.execute(sql, args)
    return cursor.fetchall() if query.mode is Mode.ROWS else cursor.fetchone()


def _sqlite_args(order: Sequence[str], params: Mapping[str, Any]) -> list[Any]:
    args = [params[name] for name in order]
    for index, given in enumerate(args):
        if type(given) not in _AS_IS:
            args[index] = _sqlite_value(given)
    return args


async def run_async(conn: Any, op: Op[T]) -> T:
    """Run an operation on an asyncpg connection, in whatever transaction the caller holds."""
    try:
        query = next(op)
        while True:
            query = op.send(await _run_postgres(conn, query))
    except StopIteration as stop:
        result: T = stop.value
        return result


async def _run_postgres(conn: Any, query: Query) -> Any:
    text = query.sql + " RETURNING id" if query.mode is Mode.INSERTED else query.sql
    sql, order = compiled("postgres", text)
    if query.mode is Mode.MANY:
        await conn.executemany(sql, [_args(order, p) for p in query.params])
        return None
    args = _args(order, query.params)
    if query.mode is Mode.ROWS:
        return await conn.fetch(sql, *args)
    if query.mode is Mode.ROW:
        return await conn.fetchrow(sql, *args)
    if query.mode in (Mode.VALUE, Mode.INSERTED):
        return await conn.fetchval(sql, *args)
    status: str = await conn.execute(sql, *args)
    return int(status.split()[-1])


def _args(order: Sequence[str], params: Mapping[str, Any]) -> list[Any]:
    return [list(v) if isinstance(v := params[name], tuple) else v for name in order]
