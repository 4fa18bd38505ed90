"""Row comparisons in Arrow between a table's new rows and its current ones (keyed by ``id``): which rows
changed, which ids are gone, which ids repeat. Vectorised, so comparing a million rows holds no Python object
per row."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def duplicate_ids(ids: pa.ChunkedArray | pa.Array) -> list[str]:
    counts = pc.value_counts(ids)
    return counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()


def _comparable(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as a type ``not_equal`` accepts (lists of labels as text)."""
    if pa.types.is_list(col.type):
        return pc.binary_join(pc.cast(col, pa.list_(pa.string())), "|")
    return col


def differs(new: pa.Table, old: pa.Table, columns: list[str]) -> np.ndarray:
    """Per row of ``new``, whether any of ``columns`` differs from ``old``'s row with the same id (a row missing
    from ``old`` differs); nulls compare equal to nulls."""
    pos = pc.index_in(new["id"], value_set=old["id"])
    out = pos.is_null().to_numpy(zero_copy_only=False).copy()
    if out.all():
        return out
    at = old.take(pc.fill_null(pos, 0))
    for c in columns:
        a, b = _comparable(new[c]), _comparable(at[c])
        ne = pc.fill_null(pc.not_equal(a, b), False)
        ne = pc.or_(ne, pc.xor(pc.is_null(a), pc.is_null(b)))
        out |= ne.to_numpy(zero_copy_only=False)
    return out


def absent_from(ids: pa.ChunkedArray | pa.Array, current: pa.ChunkedArray | pa.Array) -> list[str]:
    """The ``ids`` not in ``current`` (rows to remove)."""
    return ids.filter(pc.invert(pc.is_in(ids, value_set=current))).to_pylist() if len(ids) else []
