"""Decode-ahead encoding: for an encoder on an accelerator, raw inputs are decoded on a thread pool a few batches
ahead of it, so host decoding (JPEG + resize, wav + resample) overlaps the device's forward pass instead of
alternating with it; on the CPU each batch is decoded inline (see ``decode_workers``).
(A thread pool rather than torch's DataLoader: PIL and wave release the GIL, items are paths, and order plus
per-item failure reasons must be kept; a DataLoader adds worker processes and pickling for none of that.)"""
from __future__ import annotations

from collections import deque
from itertools import islice
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator

from models.errors import first_line
from stores.datasets.base import Unusable
from stores.encoders.base import LOAD_WORKERS, BadInput, Encoder

ABSENT_REASON = "absent in source"  # the missing-modality reason of an input the source lacks


def load_or_reason(encoder: Encoder, ref: Any) -> tuple[Any, str | None]:
    """(decoded input, None), or (None, why it is unusable) for an absent, refused or undecodable ``ref``. Any
    exception a decoder raises is one item's fault (a decoder bug, a file that vanished, an odd format): the
    item is missing with the exception as its reason, and the run goes on."""
    if ref is None:
        return None, ABSENT_REASON
    if isinstance(ref, Unusable):
        return None, ref.reason
    try:
        return encoder.load(ref), None
    except BadInput as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - per item, by design (see above)
        return None, f"undecodable: {type(e).__name__}: {first_line(e, 200)}"


def load_chunk(encoder: Encoder, refs: list[Any]) -> list[tuple[Any, str | None]]:
    return [load_or_reason(encoder, ref) for ref in refs]


def decode_workers(encoder: Encoder) -> int:
    """Threads decoding ahead of an encoder: none when it runs on the CPU, whose forward pass already keeps every
    core busy (decode threads only contend with torch's: 2 cores, EfficientNet-Lite0 on Fashion photos ran at
    45-48 img/s with 0, 1 or 2 threads, and a tiny ViT over 32x32 JPEGs 1.3x slower with threads than inline),
    ``LOAD_WORKERS`` on an accelerator, where decoding overlaps the device's work."""
    device = getattr(encoder, "device", "cpu")
    return 0 if str(getattr(device, "type", device)) == "cpu" else LOAD_WORKERS


def encode_stream(encoder: Encoder, refs: Iterable[Any], batch_size: int, workers: int | None = None,
                  prefetch: int = 2) -> Iterator[tuple[dict | None, str | None]]:
    """For each raw ref, in order: ``({"vec", "tok", "emb"}, None)`` or ``(None, reason)`` for an absent or
    undecodable input. With ``workers`` threads (default ``decode_workers``), up to ``prefetch`` batches are
    decoded while one is encoded; a task decodes a chunk of a batch (a batch split over the workers), not one
    item: a future per item cost more than decoding a small JPEG. With 0, each batch is decoded inline."""
    it = iter(refs)
    workers = decode_workers(encoder) if workers is None else workers
    if workers == 0:
        while refs_ := list(islice(it, batch_size)):
            yield from encode_loaded(encoder, load_chunk(encoder, refs_))
        return
    chunk = max(1, -(-batch_size // workers))
    window: deque[Future] = deque()  # futures of decoded chunks, in order
    ready: deque[tuple[Any, str | None]] = deque()  # decoded items not yet in a batch
    with ThreadPoolExecutor(workers) as pool:
        def fill() -> None:
            while (len(window) * chunk) < (prefetch + 1) * batch_size and (refs_ := list(islice(it, chunk))):
                window.append(pool.submit(load_chunk, encoder, refs_))

        fill()
        while window or ready:
            while len(ready) < batch_size and window:
                ready.extend(window.popleft().result())
            fill()  # the next batches decode while this one encodes
            yield from encode_loaded(encoder, [ready.popleft() for _ in range(min(batch_size, len(ready)))])


def encode_loaded(encoder: Encoder, batch: list[tuple[Any, str | None]]) -> Iterator[tuple[dict | None, str | None]]:
    """One batch of ``load_or_reason`` results -> its features or reasons, in order (one forward pass)."""
    ok = [i for i, (x, _) in enumerate(batch) if x is not None]
    feats: dict[int, dict] = {}
    if ok:
        enc = encoder.encode([batch[i][0] for i in ok])
        feats = {i: enc.item(k) for k, i in enumerate(ok)}
    for i, (_, reason) in enumerate(batch):
        yield feats.get(i), reason
