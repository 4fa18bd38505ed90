"""Classify raw samples (any modalities missing) with a trained head and the same frozen encoders: the runtime of
a registered model, in ``mm predict`` and ``mm evaluate`` as in ``mlflow models serve``."""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.calibration import presence_key
from models.config import ExperimentConfig
from models.heads import FeatureBatch, Head, ModalitySpec, build_head
from models.records import StoreMeta
from models.training import predict
from stores.config_files import validate
from stores.datasets.base import Unusable
from stores.datasets.manifest import inside
from stores.encoders import BadInput, Encoder, build_encoder, load_backbones
from stores.encoders.stream import load_or_reason
from stores.features.feature_store import decode_tokens
from stores.features.views import tokens


INLINE = ("data:", "base64:")  # an input sent inline: "data:image/png;base64,...." or "base64:...."


def inline_bytes(value: str) -> bytes:
    """The bytes of an inline input (a data URI or ``base64:``), or BadInput when they are not base64."""
    body = value.split(",", 1)[1] if value.startswith("data:") else value.removeprefix("base64:")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("inline input is not valid base64") from None


class Predictor:
    """Holds a head, the store metadata it was trained on and lazily built encoders. ``roots``: the folders a
    sample's file paths may point into; None reads any path (``mm predict`` on the user's own files), [] none
    (a served model by default: clients send data inline)."""

    def __init__(self, cfg: ExperimentConfig, head: Head, meta: StoreMeta, roots: list[Path] | None = None,
                 temperatures: dict[str, float] | None = None):
        self.cfg, self.head, self.meta, self.roots = cfg, head.eval(), meta, roots
        self.temperatures = temperatures or {}  # per set of present modalities; models before it: none (T = 1)
        self._encoders: dict[str, Encoder] = {}

    def raw_input(self, m: str, value: Any) -> Any:
        """A sample's value for modality ``m`` as its encoder loads it: text as given, a path (only under
        ``roots``), inline base64 bytes, or audio samples as a list of floats. None when missing."""
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return None
        if m == "audio" and isinstance(value, (list, tuple, np.ndarray)):
            return np.asarray(value, np.float32)
        if m != "text" and isinstance(value, str):
            if value.startswith(INLINE):
                return inline_bytes(value)
            if self.roots is not None:
                where = inside(Path(value), self.roots)
                if isinstance(where, Unusable):
                    raise BadInput("server-side paths are not read here (send the file inline as base64)"
                                   if not self.roots else where.reason)
                return where
        return value

    @classmethod
    def from_files(cls, config: Path | str, meta: Path | str, state: Path | str,
                   roots: list[Path] | None = None) -> "Predictor":
        """The predictor of a registered model's three artifacts (its config, the store metadata it was trained
        on, its weights), rebuilt by this code: models registered by earlier versions load the same way."""
        cfg = validate(yaml.safe_load(Path(config).read_text()), f" {config}")
        store_meta = StoreMeta.from_dict(json.loads(Path(meta).read_text()))
        extras = torch.load(state, map_location="cpu", weights_only=False)
        backbones = load_backbones(cfg.head, cfg.encoder_configs(), store_meta.emb_dim)
        head = build_head(cfg.head, ModalitySpec(**extras["spec"]), backbones)
        head.load_state_dict(extras["state_dict"])
        cfg.train.device = "cpu" if not torch.cuda.is_available() else cfg.train.device
        return cls(cfg, head, store_meta, roots, extras.get("temperatures"))

    def encoder(self, m: str) -> Encoder:
        if m not in self._encoders:
            self._encoders[m] = build_encoder(m, self.cfg.encoder_configs()[m])
        return self._encoders[m]

    def features(self, samples: list[dict[str, Any]], reasons: list[dict[str, str]] | None = None) -> FeatureBatch:
        """Encode samples ({modality: path/inline/text/None}); missing or unreadable inputs use the placeholder,
        and why an input was unusable goes into ``reasons`` (one dict per sample)."""
        meta, mods = self.meta, self.meta.modalities
        present = torch.zeros(len(samples), len(mods), dtype=torch.bool)
        batch = FeatureBatch(present, torch.zeros(len(samples), dtype=torch.long))
        for j, m in enumerate(mods):
            enc = self.encoder(m)
            raw = []
            for i, s in enumerate(samples):
                try:
                    value = self.raw_input(m, s.get(m))
                except BadInput as e:
                    value = Unusable(str(e))
                x, why = load_or_reason(enc, value)  # any decoder failure is this input's, never the request's
                raw.append(x)
                if why and value is not None and reasons is not None:
                    reasons[i][m] = why
                present[i, j] = x is not None
            ph = enc.encode_placeholder()
            idx = [i for i, x in enumerate(raw) if x is not None]
            out = enc.encode([raw[i] for i in idx]) if idx else None
            pick = lambda field, i: (getattr(out, field)[idx.index(i)] if i in idx else getattr(ph, field)[0])  # noqa: E731
            batch.vec[m] = torch.from_numpy(np.stack([pick("vec", i) for i in range(len(samples))]).astype(np.float32))
            for kind, dim, length in (("tok", meta.tok_dim, meta.tok_len), ("emb", meta.emb_dim, meta.emb_len)):
                if m in dim and kind in self.head.inputs:  # a vector head reads no tokens: none are packed
                    blobs, lengths = tokens([pick(kind, i) for i in range(len(samples))])
                    x, mask = decode_tokens(blobs, lengths.to_numpy(), dim[m], length[m])
                    getattr(batch, kind)[m], getattr(batch, f"{kind}_mask")[m] = torch.from_numpy(x), torch.from_numpy(mask)
        return batch

    def predict(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One answer per sample: the label (and probability), the modalities it was made from, and
        ``abstain`` with its ``reason`` when no modality was usable: no guess is made from placeholders alone."""
        reasons: list[dict[str, str]] = [{} for _ in samples]
        batch = self.features(samples, reasons)
        logits = predict(self.head, batch, self.cfg.train)
        classes, mods = self.meta.classes, self.meta.modalities
        out = []
        for i, (logit, row) in enumerate(zip(logits, batch.present.tolist())):
            used = [m for m, f in zip(mods, row) if f]
            unusable = "; ".join(f"{m}: {why}" for m, why in reasons[i].items())
            if not used:
                answer = {"label": None, "prob": None} if self.meta.task != "multilabel" else {"labels": []}
                out.append({**answer, "present": [], "abstain": True,
                            "reason": "no usable modality" + (f" ({unusable})" if unusable else ": all missing")})
                continue
            if self.meta.task == "multilabel":
                answer = {"labels": [classes[k] for k in torch.nonzero(torch.sigmoid(logit) > 0.5).flatten().tolist()]}
            else:  # probabilities calibrated for the modalities this sample came with
                p = torch.softmax(logit / self.temperatures.get(presence_key(used), 1.0), -1)
                answer = {"label": classes[int(p.argmax())], "prob": float(p.max())}
                if answer["prob"] < self.cfg.tracking.abstain_below:
                    out.append({**answer, "present": used, "abstain": True, "reason": (
                        f"low confidence: {answer['prob']:.3f} < tracking.abstain_below "
                        f"{self.cfg.tracking.abstain_below}" + (f"; {unusable}" if unusable else ""))})
                    continue
            out.append({**answer, "present": used, "abstain": False, "reason": unusable or None})
        return out
