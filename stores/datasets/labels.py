"""Label cells as class names: numbers written one way, multi-label cells split, a numbers/names mix refused."""
from __future__ import annotations

import math
import re
from typing import Any

from .base import DatasetError

NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def label_name(v: Any) -> str:
    """A label as its class name: numbers and numeric-looking strings written one way (``1``, ``"1"``, ``1.0``
    and ``" 1 "`` are class "1"; pandas writes an int column with gaps as floats), others stripped. Empty for
    a missing label (None, NaN, blank)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    text = str(v).strip()
    if NUMBER.fullmatch(text):
        number = float(text)
        return str(int(number)) if number.is_integer() else repr(number)
    return text


def label_names(v: Any, multilabel: bool) -> list[str]:
    """A label cell's class names: one, or for multi-label a list or ``a|b``; none for a missing label."""
    cells = v if isinstance(v, list) else label_name(v).split("|") if multilabel else [v]
    return [n for c in cells if (n := label_name(c))]


def check_label_kinds(labels: list[list[str]], ids: list[str], where: str) -> None:
    """Refuse a label column that mixes numbers and names (``1``, ``2``, ``cat``): one of the two is probably
    a mistake, and a model would silently learn both as classes. ``data.classes`` states such a set on purpose."""
    numeric = [i for i, ls in enumerate(labels) if ls and all(NUMBER.fullmatch(c) for c in ls)]
    is_numeric = set(numeric)
    named = [i for i, ls in enumerate(labels) if ls and i not in is_numeric]
    if numeric and named:
        few = min(numeric, named, key=len)
        kind = "names" if few is named else "numbers"
        shown = ", ".join(f"{i} (id={ids[i]}, label {'|'.join(labels[i])!r})" for i in few[:3])
        raise DatasetError(f"manifest {where} mixes numeric labels and names: {len(few)} rows have {kind}, e.g. "
                           f"rows {shown}; fix them, or list the classes on purpose in data.classes")
