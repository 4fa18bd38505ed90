"""Baselines every paper compares with: zero-fill early fusion, zero-fill late fusion, modality dropout."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import FeatureBatch, Head, HeadConfig, HeadOutput, ModalitySpec, mlp, register_head, sample_keep_mask


class _FillMixin(Head):
    """Feeds missing or dropped modalities as zeros ("zeros", classic zero-fill) or as the frozen encoder's
    embedding of the empty input ("placeholder", from the store)."""

    def __init__(self, cfg: HeadConfig, spec: ModalitySpec):
        super().__init__(cfg, spec)
        for m in spec.modalities:
            ph = spec.placeholder_vec.get(m, torch.zeros(spec.vec_dim[m]))
            self.register_buffer(f"placeholder_{m}", ph.float().reshape(-1), persistent=False)

    def filled(self, batch: FeatureBatch, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for i, m in enumerate(self.spec.modalities):
            v, k = batch.vec[m], keep[:, i : i + 1]
            fill = v.new_zeros(()) if self.cfg.fill == "zeros" else getattr(self, f"placeholder_{m}").to(v.dtype)
            out[m] = torch.where(k, v, fill)
        return out


class _FusionConfig(HeadConfig):
    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    fill: Literal["placeholder", "zeros"] = "zeros"


class EarlyFusionConfig(_FusionConfig):
    name: Literal["early"] = "early"


@register_head(EarlyFusionConfig)
class EarlyFusion(_FillMixin):
    """Concatenate pooled vectors (missing ones filled) and classify with an MLP."""

    def __init__(self, cfg: EarlyFusionConfig, spec: ModalitySpec):
        super().__init__(cfg, spec)
        self.norms = nn.ModuleDict({m: nn.LayerNorm(spec.vec_dim[m]) for m in spec.modalities})
        self.net = mlp(sum(spec.vec_dim.values()), cfg.hidden, spec.n_classes, cfg.dropout)

    def train_keep(self, batch: FeatureBatch) -> torch.Tensor:
        return batch.present

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        keep = self.train_keep(batch) if self.training else batch.present
        vecs = self.filled(batch, keep)
        x = torch.cat([self.norms[m](vecs[m]) for m in self.spec.modalities], dim=-1)
        return HeadOutput(self.net(x), self.zero(x))


class ModalityDropoutConfig(_FusionConfig):
    name: Literal["moddrop"] = "moddrop"
    p: float = Field(0.5, ge=0, le=1)


@register_head(ModalityDropoutConfig)
class ModalityDropout(EarlyFusion):
    """Early fusion trained with modality dropout: each present modality is zeroed with prob p (never all)."""

    def train_keep(self, batch: FeatureBatch) -> torch.Tensor:
        return sample_keep_mask(batch.present, self.cfg.p)


class LateFusionConfig(_FusionConfig):
    name: Literal["late"] = "late"


@register_head(LateFusionConfig)
class LateFusion(_FillMixin):
    """One classifier per modality on its (filled) pooled vector; logits averaged over all modalities."""

    def __init__(self, cfg: LateFusionConfig, spec: ModalitySpec):
        super().__init__(cfg, spec)
        self.branches = nn.ModuleDict({
            m: nn.Sequential(nn.LayerNorm(spec.vec_dim[m]), mlp(spec.vec_dim[m], cfg.hidden, spec.n_classes,
                                                                cfg.dropout))
            for m in spec.modalities})

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        vecs = self.filled(batch, batch.present)
        logits = torch.stack([self.branches[m](vecs[m]) for m in self.spec.modalities]).mean(0)
        return HeadOutput(logits, self.zero(logits))
