"""Encoding with Ray Data: one streaming dataset whose rows are encoder batches (any modalities, in the order
given). The encoders' ``load`` decodes each batch in a CPU task, a pool of encoder actors (each holding the
encoders of every modality it meets, one GPU each when the cluster has GPUs) encodes it, and the batches stream
back in order, so a consumer commits results while later batches are still being encoded and Ray Data's job
start-up is paid once per extraction, not per batch.

On a CPU-only cluster Ray Data fuses the decode tasks into the actors (same resources), which saves moving the
decoded inputs through the object store; with GPUs the decoding stays in separate CPU tasks feeding the actors.
Batches travel as pickled bytes, so any encoder's input type (tensor, array, string) and the ragged token arrays
pass through Arrow unchanged. Ray Data restarts a killed actor and retries its batch (actor pools default to
``max_restarts=-1, max_task_retries=-1``); a killed decode task is retried too.
"""
from __future__ import annotations

import functools
import pickle
import time
from typing import Any, Iterable, Iterator

from models.config import EncoderConfig
from stores.encoders import Encoder, build_encoder
from stores.encoders.stream import load_or_reason

Items = list[tuple[str, Any]]  # (content key, raw input)
Encoded = list[tuple[str, "dict[str, Any] | str"]]  # (content key, {vec, tok, emb} or the reason it is unusable)


@functools.lru_cache(maxsize=8)
def _encoder(modality: str, cfg_json: str) -> Encoder:
    """One encoder per worker process and config: a decode task fused into a CPU actor uses the actor's."""
    return build_encoder(modality, EncoderConfig.model_validate_json(cfg_json))


def _decode(row: dict[str, Any], cfgs_json: dict[str, str]) -> dict[str, Any]:
    """A batch's raw inputs -> decoded inputs, or the reason one is unusable (``None`` input)."""
    t0 = time.perf_counter()
    modality, items = pickle.loads(row["batch"])
    encoder = _encoder(modality, cfgs_json[modality])  # for its ``load``: a CPU copy, decoding needs no GPU
    out = [(key, *load_or_reason(encoder, ref)) for key, ref in items]
    return {"batch": pickle.dumps((modality, out), protocol=5), "seconds": time.perf_counter() - t0}


class _EncodeActor:
    """Holds the encoders (on the GPU Ray assigned, if any) and encodes the decodable inputs of each batch."""

    def __init__(self, cfgs_json: dict[str, str], threads: int):
        import torch
        torch.set_num_threads(threads)
        self.cfgs_json = cfgs_json
        for m, cfg_json in cfgs_json.items():  # loaded here, not in the first batch's timing
            _encoder(m, cfg_json)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        modality, items = pickle.loads(row["batch"])
        good = [i for i, (_, x, reason) in enumerate(items) if reason is None]
        feats: dict[int, dict] = {}
        if good:
            enc = _encoder(modality, self.cfgs_json[modality]).encode([items[i][1] for i in good])
            feats = {i: enc.item(k) for k, i in enumerate(good)}
        out = [(key, feats[i] if reason is None else reason) for i, (key, _, reason) in enumerate(items)]
        return {"batch": pickle.dumps((modality, out), protocol=5),
                "seconds": row["seconds"] + time.perf_counter() - t0}


def encode_batches(encoder_cfgs: dict[str, EncoderConfig], batches: Iterable[tuple[str, Items]], *,
                   actors: int = 1, num_gpus: float | None = None,
                   cpus_per_actor: float = 1.0) -> Iterator[tuple[str, Encoded, float]]:
    """(modality, [(key, raw input)]) batches -> (modality, [(key, features or reason)], seconds the workers spent
    decoding and encoding it), in input order, streamed as they complete. ``actors`` encoder actors each reserve
    ``cpus_per_actor`` CPUs (their torch threads) and ``num_gpus`` GPUs (None: 1 when the cluster has GPUs). Uses
    the connected Ray cluster, or starts a local one."""
    import ray

    rows = [{"batch": pickle.dumps(b, protocol=5)} for b in batches]
    if not rows:
        return
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    cpu_json = {m: c.model_copy(update={"device": "cpu"}).model_dump_json() for m, c in encoder_cfgs.items()}
    cfgs_json = {m: c.model_dump_json() for m, c in encoder_cfgs.items()} if num_gpus else cpu_json  # no GPU: none used
    ds = ray.data.from_items(rows)
    ds.context.execution_options.preserve_order = True
    ds = ds.map(_decode, num_cpus=1, fn_kwargs={"cfgs_json": cpu_json})
    ds = ds.map(_EncodeActor, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                num_gpus=num_gpus, fn_constructor_kwargs={"cfgs_json": cfgs_json,
                                                          "threads": max(1, int(cpus_per_actor))})
    for row in ds.iter_rows():
        yield *pickle.loads(row["batch"]), row["seconds"]


def encode_items(encoder_cfg: EncoderConfig, modality: str, refs: Items, batch_size: int = 32, *,
                 actors: int = 1, num_gpus: float | None = None,
                 cpus_per_actor: float = 1.0) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """One modality: (key, raw input) pairs -> (key, ``{vec, tok, emb}``) or (key, reason the input is unusable),
    in input order; the same contract as the single-process ``stores.extraction.local.encode_items``."""
    batches = ((modality, refs[i : i + batch_size]) for i in range(0, len(refs), batch_size))
    for _, encoded, _ in encode_batches({modality: encoder_cfg}, batches, actors=actors, num_gpus=num_gpus,
                                     cpus_per_actor=cpus_per_actor):
        yield from encoded
