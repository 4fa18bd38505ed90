"""Unimodal oracle: trained and tested on one modality only, the ceiling when the other modalities are missing."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import FeatureBatch, Head, HeadConfig, HeadOutput, ModalitySpec, mlp, register_head


class OracleConfig(HeadConfig):
    name: Literal["oracle"] = "oracle"
    modality: str | None = None  # the one modality it sees; None: the store's first modality
    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)

    @property
    def label(self) -> str:
        return f"oracle-{self.modality}" if self.modality else "oracle"


@register_head(OracleConfig)
class Oracle(Head):
    """LayerNorm + MLP over ``modality``'s pooled vector; every other modality is ignored. The runner trains it
    only on rows where ``modality`` is present (``modalities_used``)."""

    def __init__(self, cfg: OracleConfig, spec: ModalitySpec):
        super().__init__(cfg, spec)
        m = cfg.modality or spec.modalities[0]
        if m not in spec.modalities:
            raise ValueError(f"oracle modality {m!r} not in the store's modalities {spec.modalities}")
        self.modality, self.col = m, spec.modalities.index(m)
        self.modalities_used = (m,)
        self.variant = {"only": m}
        d = spec.vec_dim[m]
        self.register_buffer("placeholder", spec.placeholder_vec.get(m, torch.zeros(d)).float().reshape(-1),
                             persistent=False)
        self.net = nn.Sequential(nn.LayerNorm(d), mlp(d, cfg.hidden, spec.n_classes, cfg.dropout))

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        v = batch.vec[self.modality]
        x = torch.where(batch.present[:, self.col : self.col + 1], v, self.placeholder.to(v.dtype))
        logits = self.net(x)
        return HeadOutput(logits, self.zero(logits))
