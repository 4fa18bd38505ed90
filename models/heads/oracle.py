"""Unimodal oracle: trained and tested on one modality only, the ceiling when the other modalities are missing."""
from __future__ import annotations

import torch
from torch import nn

from ..head_configs import OracleConfig
from .base import FeatureBatch, Head, HeadOutput, ModalitySpec, mlp, register_head
from .streams import lora_stream, stream_class_token


@register_head(OracleConfig)
class Oracle(Head):
    """"pooled_vector": LayerNorm + MLP over ``modality``'s pooled vector. "encoder+lora": the encoder's blocks
    with LoRA over its cached embedding-layer tokens, a linear classifier on the class-token output (CMPT's
    stream and Eq. 6 with one modality and no proxies). Every other modality is ignored; the runner trains it
    only on rows where ``modality`` is present (``modalities_used``)."""

    needs_backbones = True

    def __init__(self, cfg: OracleConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None):
        super().__init__(cfg, spec)
        m = cfg.modality or spec.modalities[0]
        if m not in spec.modalities:
            raise ValueError(f"oracle modality {m!r} not in the store's modalities {spec.modalities}")
        self.modality, self.col = m, spec.modalities.index(m)
        self.modalities_used = (m,)
        self.variant = {"only": m}
        if cfg.backbone == "encoder+lora":
            if m not in (backbones or {}):
                raise ValueError(f"oracle backbone='encoder+lora' but no encoder blocks for {m!r} (CNN encoders "
                                 "have none; use backbone='pooled_vector')")
            self.stream, self.cls_source = lora_stream(backbones[m], cfg)
            self.net = nn.Linear(self.stream.hidden_size, spec.n_classes)
            self.variant["backbone"] = "encoder+lora"
            return
        d = spec.vec_dim[m]
        self.register_buffer("placeholder", spec.placeholder_vec.get(m, torch.zeros(d)).float().reshape(-1),
                             persistent=False)
        self.net = nn.Sequential(nn.LayerNorm(d), mlp(d, cfg.hidden, spec.n_classes, cfg.dropout))

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("emb",) if self.cfg.backbone == "encoder+lora" else ("vec",)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        if self.cfg.backbone == "encoder+lora":  # a missing row holds the encoder's placeholder tokens
            logits = self.net(stream_class_token(self.stream, self.cls_source, batch.emb[self.modality],
                                                 batch.emb_mask[self.modality]))
            return HeadOutput(logits, self.zero(logits))
        v = batch.vec[self.modality]
        x = torch.where(batch.present[:, self.col : self.col + 1], v, self.placeholder.to(v.dtype))
        logits = self.net(x)
        return HeadOutput(logits, self.zero(logits))
