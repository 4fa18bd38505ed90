"""Decode-ahead encoding: raw inputs are decoded on a thread pool a few batches ahead of the encoder, so host
decoding (JPEG + resize, wav + resample) overlaps the device's forward pass instead of alternating with it.
(A thread pool rather than torch's DataLoader: PIL and wave release the GIL, items are paths, and order plus
per-item failure reasons must be kept; a DataLoader adds worker processes and pickling for none of that.)"""
from __future__ import annotations

from collections import deque
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


def encode_stream(encoder: Encoder, refs: Iterable[Any], batch_size: int, workers: int = LOAD_WORKERS,
                  prefetch: int = 2) -> Iterator[tuple[dict | None, str | None]]:
    """For each raw ref, in order: ``({"vec", "tok", "emb"}, None)`` or ``(None, reason)`` for an absent or
    undecodable input. Up to ``prefetch`` batches are decoded while one is encoded."""
    it = iter(refs)
    window: deque[Future] = deque()
    with ThreadPoolExecutor(workers) as pool:
        def fill() -> None:
            while len(window) < (prefetch + 1) * batch_size:
                ref = next(it, StopIteration)
                if ref is StopIteration:
                    return
                window.append(pool.submit(load_or_reason, encoder, ref))

        fill()
        while window:
            batch = [window.popleft().result() for _ in range(min(batch_size, len(window)))]
            fill()  # the next batches decode while this one encodes
            ok = [i for i, (x, _) in enumerate(batch) if x is not None]
            feats: dict[int, dict] = {}
            if ok:
                enc = encoder.encode([batch[i][0] for i in ok])
                feats = {i: enc.item(k) for k, i in enumerate(ok)}
            for i, (_, reason) in enumerate(batch):
                yield feats.get(i), reason
