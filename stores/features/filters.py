"""Lance SQL filters built from typed values: the one place that quotes, so an id holding a quote stays a value
and never becomes SQL. (Lance takes filters as SQL strings; this keeps every caller off f-string SQL.)"""
from __future__ import annotations

from typing import Any, Iterable

import re

_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def literal(value: Any) -> str:
    """A SQL literal: strings single-quoted with quotes doubled, bools as TRUE/FALSE, ints/floats as numbers."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"cannot use {type(value).__name__} {value!r} as a filter value")


def column(name: str) -> str:
    if not _COLUMN.match(name):
        raise ValueError(f"{name!r} is not a column name")
    return name


def eq(name: str, value: Any) -> str:
    return f"{column(name)} = {literal(value)}"


def ne(name: str, value: Any) -> str:
    return f"{column(name)} != {literal(value)}"


def isin(name: str, values: Iterable[Any]) -> str:
    vals = [literal(v) for v in values]
    return f"{column(name)} IN ({', '.join(vals)})" if vals else "FALSE"


def all_of(*clauses: str | None) -> str | None:
    """AND of the non-empty clauses, each parenthesised; None when there are none."""
    kept = [c for c in clauses if c]
    return " AND ".join(f"({c})" for c in kept) or None
