"""Classify raw samples (any modalities missing) with a trained head and the same frozen encoders: the runtime of
a registered model, in ``mm predict`` and ``mm evaluate`` as in ``mlflow models serve``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.config import ExperimentConfig
from models.heads import FeatureBatch, Head, ModalitySpec, build_head
from models.records import StoreMeta
from models.training import predict
from stores.config_files import validate
from stores.encoders import BadInput, Encoder, build_encoder, load_backbones
from stores.features.feature_store import decode_tokens
from stores.features.views import tokens


class Predictor:
    """Holds a head, the store metadata it was trained on and lazily built encoders."""

    def __init__(self, cfg: ExperimentConfig, head: Head, meta: StoreMeta):
        self.cfg, self.head, self.meta = cfg, head.eval(), meta
        self._encoders: dict[str, Encoder] = {}

    @classmethod
    def from_files(cls, config: Path | str, meta: Path | str, state: Path | str) -> "Predictor":
        """The predictor of a registered model's three artifacts (its config, the store metadata it was trained
        on, its weights), rebuilt by this code: models registered by earlier versions load the same way."""
        cfg = validate(yaml.safe_load(Path(config).read_text()), f" {config}")
        store_meta = StoreMeta.from_dict(json.loads(Path(meta).read_text()))
        extras = torch.load(state, map_location="cpu", weights_only=False)
        backbones = load_backbones(cfg.head, cfg.encoder_configs(), store_meta.emb_dim)
        head = build_head(cfg.head, ModalitySpec(**extras["spec"]), backbones)
        head.load_state_dict(extras["state_dict"])
        cfg.train.device = "cpu" if not torch.cuda.is_available() else cfg.train.device
        return cls(cfg, head, store_meta)

    def encoder(self, m: str) -> Encoder:
        if m not in self._encoders:
            self._encoders[m] = build_encoder(m, self.cfg.encoder_configs()[m])
        return self._encoders[m]

    def features(self, samples: list[dict[str, Any]]) -> FeatureBatch:
        """Encode samples ({modality: path/text/None}); missing or unreadable inputs use the placeholder."""
        meta, mods = self.meta, self.meta.modalities
        present = torch.zeros(len(samples), len(mods), dtype=torch.bool)
        batch = FeatureBatch(present, torch.zeros(len(samples), dtype=torch.long))
        for j, m in enumerate(mods):
            enc = self.encoder(m)
            raw = []
            for i, s in enumerate(samples):
                v = s.get(m)
                try:
                    raw.append(enc.load(v) if v is not None and not (isinstance(v, float) and np.isnan(v)) else None)
                except BadInput:
                    raw.append(None)
                present[i, j] = raw[-1] is not None
            ph = enc.encode_placeholder()
            idx = [i for i, x in enumerate(raw) if x is not None]
            out = enc.encode([raw[i] for i in idx]) if idx else None
            pick = lambda field, i: (getattr(out, field)[idx.index(i)] if i in idx else getattr(ph, field)[0])  # noqa: E731
            batch.vec[m] = torch.from_numpy(np.stack([pick("vec", i) for i in range(len(samples))]).astype(np.float32))
            for kind, dim, length in (("tok", meta.tok_dim, meta.tok_len), ("emb", meta.emb_dim, meta.emb_len)):
                if m in dim:
                    blobs, lengths = tokens([pick(kind, i) for i in range(len(samples))])
                    x, mask = decode_tokens(blobs, lengths.to_numpy(), dim[m], length[m])
                    getattr(batch, kind)[m], getattr(batch, f"{kind}_mask")[m] = torch.from_numpy(x), torch.from_numpy(mask)
        return batch

    def predict(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        batch = self.features(samples)
        logits = predict(self.head, batch, self.cfg.train)
        classes = self.meta.classes
        if self.meta.task == "multilabel":
            prob = torch.sigmoid(logits)
            return [{"labels": [classes[k] for k in torch.nonzero(p > 0.5).flatten().tolist()],
                     "present": [m for m, f in zip(self.meta.modalities, row) if f]}
                    for p, row in zip(prob, batch.present.tolist())]
        prob = torch.softmax(logits, -1)
        return [{"label": classes[int(p.argmax())], "prob": float(p.max()),
                 "present": [m for m, f in zip(self.meta.modalities, row) if f]}
                for p, row in zip(prob, batch.present.tolist())]
