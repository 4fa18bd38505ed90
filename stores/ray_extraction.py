"""Encoding one modality's inputs with Ray Data: the encoder's ``load`` decodes in CPU tasks, a pool of encoder
actors (one GPU each when the cluster has GPUs) encodes, and results stream back in input order.

On a CPU-only cluster Ray Data fuses the decode tasks into the actors (same resources), which saves moving the
decoded inputs through the object store; with GPUs the decoding stays in separate CPU tasks feeding the actors.
Inputs and features travel as pickled bytes, so any encoder's input type (tensor, array, string) and the ragged
token arrays pass through Arrow unchanged.
"""
from __future__ import annotations

import functools
import pickle
from typing import Any, Iterator

import numpy as np

from models.config import EncoderConfig
from .encoders import BadInput, Encoder, build_encoder

ABSENT = "absent in source"


@functools.lru_cache(maxsize=4)
def _encoder(modality: str, cfg_json: str) -> Encoder:
    """One encoder per worker process and config: a decode task fused into a CPU actor uses the actor's."""
    return build_encoder(modality, EncoderConfig.model_validate_json(cfg_json))


def _decode(batch: dict[str, np.ndarray], modality: str, cfg_json: str) -> dict[str, np.ndarray]:
    encoder = _encoder(modality, cfg_json)  # for its ``load``: a CPU copy, decoding needs no GPU
    inputs, reasons = [], []
    for raw in batch["ref"]:
        ref = pickle.loads(raw)
        try:
            if ref is None:
                raise BadInput(ABSENT)
            inputs.append(pickle.dumps(encoder.load(ref), protocol=5))
            reasons.append("")
        except BadInput as e:
            inputs.append(b"")
            reasons.append(str(e))
    return {"key": batch["key"], "input": np.array(inputs, dtype=object), "reason": np.array(reasons, dtype=object)}


class _EncodeActor:
    """Holds one encoder (on the GPU Ray assigned, if any) and encodes the decodable inputs of each batch."""

    def __init__(self, modality: str, cfg_json: str, threads: int):
        import torch
        torch.set_num_threads(threads)
        self.encoder = _encoder(modality, cfg_json)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = [i for i, reason in enumerate(batch["reason"]) if not reason]
        feats = [b""] * len(batch["key"])
        if good:
            enc = self.encoder.encode([pickle.loads(batch["input"][i]) for i in good])
            for k, i in enumerate(good):
                feats[i] = pickle.dumps(enc.item(k), protocol=5)
        return {"key": batch["key"], "features": np.array(feats, dtype=object), "reason": batch["reason"]}


def encode_items(encoder_cfg: EncoderConfig, modality: str, refs: list[tuple[str, Any]], batch_size: int = 32, *,
                 actors: int = 1, num_gpus: float | None = None,
                 cpus_per_actor: float = 1.0) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(key, raw input) pairs -> (key, ``{vec, tok, emb}``) or (key, reason the input is unusable), in input
    order. ``actors`` encoder actors each reserve ``cpus_per_actor`` CPUs (their torch threads) and ``num_gpus``
    GPUs (None: 1 when the cluster has GPUs). Uses the connected Ray cluster, or starts a local one."""
    import ray

    if not refs:
        return
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    cpu_json = encoder_cfg.model_copy(update={"device": "cpu"}).model_dump_json()
    cfg_json = encoder_cfg.model_dump_json() if num_gpus else cpu_json  # no GPU reserved: none used
    ds = ray.data.from_items([{"key": k, "ref": pickle.dumps(r, protocol=5)} for k, r in refs])
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(_decode, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"modality": modality, "cfg_json": cpu_json})
    ds = ds.map_batches(_EncodeActor, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cpus_per_actor, num_gpus=num_gpus,
                        fn_constructor_kwargs={"modality": modality, "cfg_json": cfg_json,
                                               "threads": max(1, int(cpus_per_actor))})
    for row in ds.iter_rows():
        yield row["key"], row["reason"] or pickle.loads(row["features"])
