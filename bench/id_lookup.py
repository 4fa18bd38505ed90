"""Matching each source batch's ids against a whole id column (issue 21): ``pc.index_in(batch, value_set=column)``
per batch, as the extraction did, against ``IdIndex`` (the column hashed and sorted once). Synthetic ids, no
store: the lookup's own cost. Prints seconds per pass over N rows in batches of B and the growth exponent of each.

    python bench/id_lookup.py --sizes 64000 256000 1000000 --batch 350

The old way is timed on ``--sample`` batches and scaled to the pass (a full pass at 1M ids takes minutes); the
index is timed over the whole pass, its build included."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stores.features.row_diff import IdIndex  # noqa: E402


def ids(n: int) -> pa.Array:
    return pa.array([f"item-{i:09d}" for i in range(n)], pa.string())


def per_pass_index_in(column: pa.Array, batch: int, sample: int) -> float:
    n, t0 = len(column), time.perf_counter()
    for s in range(sample):
        start = (s * 7919 * batch) % max(n - batch, 1)
        pc.index_in(column.slice(start, batch), value_set=column)
    return (time.perf_counter() - t0) / sample * math.ceil(n / batch)


def per_pass_id_index(column: pa.Array, batch: int) -> float:
    t0 = time.perf_counter()
    index = IdIndex(column)
    for start in range(0, len(column), batch):
        index.index_in(column.slice(start, batch))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64_000, 256_000, 1_000_000])
    ap.add_argument("--batch", type=int, default=350, help="rows a source batch (24 KB images: about 350)")
    ap.add_argument("--sample", type=int, default=20)
    args = ap.parse_args()
    rows = []
    print("| rows | pc.index_in per batch: s a pass | IdIndex: s a pass (build included) | ratio |")
    print("|---|---|---|---|")
    for n in args.sizes:
        column = ids(n)
        old, new = per_pass_index_in(column, args.batch, args.sample), per_pass_id_index(column, args.batch)
        rows.append((n, old, new))
        print(f"| {n:,} | {old:.1f} | {new:.2f} | {old / new:.0f}x |", flush=True)
    (n0, o0, i0), (n1, o1, i1) = rows[0], rows[-1]
    grow = math.log(n1 / n0)
    print(f"\ngrowth exponent {n0:,} -> {n1:,} rows: pc.index_in {math.log(o1 / o0) / grow:.2f}, "
          f"IdIndex {math.log(i1 / i0) / grow:.2f} (1 = linear)")


if __name__ == "__main__":
    main()
