"""Baselines every paper compares with: zero-fill early fusion, zero-fill late fusion, modality dropout; each on
the frozen pooled vectors or, as this project's "encoder+lora" extension, on LoRA-tuned encoder streams."""
from __future__ import annotations

import torch
from torch import nn

from ..head_configs import EarlyFusionConfig, FusionConfig, LateFusionConfig, ModalityDropoutConfig
from .base import (FeatureBatch, Head, HeadOutput, ModalitySpec, mlp, present_mean, register_head,
                   sample_keep_mask)
from .streams import lora_stream, stream_class_token


class _FillMixin(Head):
    """Feeds missing or dropped modalities as zeros ("zeros", classic zero-fill) or as the frozen encoder's
    embedding of the empty input ("placeholder", from the store; pooled vectors only)."""

    needs_backbones = True

    def __init__(self, cfg: FusionConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None):
        super().__init__(cfg, spec)
        self.streams, self.cls_source = nn.ModuleDict(), {}
        if cfg.backbone == "encoder+lora":
            if not backbones:
                raise ValueError(f"{cfg.name} backbone='encoder+lora' but no modality has encoder blocks (CNN "
                                 "encoders have none; use backbone='pooled_vector')")
            if cfg.fill == "placeholder":  # the placeholder is a pooled vector; a stream's would need its tokens
                raise ValueError(f"{cfg.name} backbone='encoder+lora' fills with zeros only (fill='zeros')")
            for m in spec.modalities:
                if m in backbones:
                    self.streams[m], self.cls_source[m] = lora_stream(backbones[m], cfg)
            self.variant = {"backbone": "encoder+lora", "streams": "+".join(self.streams)}
        self.width = {m: self.streams[m].hidden_size if m in self.streams else spec.vec_dim[m]
                      for m in spec.modalities}
        for m in spec.modalities:
            ph = spec.placeholder_vec.get(m, torch.zeros(spec.vec_dim[m]))
            self.register_buffer(f"placeholder_{m}", ph.float().reshape(-1), persistent=False)

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("emb", "vec") if self.streams else ("vec",)

    def vector(self, m: str, batch: FeatureBatch) -> torch.Tensor:
        """Modality m's input vector: the LoRA stream's class-token output, or the frozen pooled vector."""
        if m not in self.streams:
            return batch.vec[m]
        return stream_class_token(self.streams[m], self.cls_source[m], batch.emb[m], batch.emb_mask[m])

    def filled(self, batch: FeatureBatch, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for i, m in enumerate(self.spec.modalities):
            v, k = self.vector(m, batch), keep[:, i : i + 1]
            fill = v.new_zeros(()) if self.cfg.fill == "zeros" else getattr(self, f"placeholder_{m}").to(v.dtype)
            out[m] = torch.where(k, v, fill)
        return out


@register_head(EarlyFusionConfig)
class EarlyFusion(_FillMixin):
    """Concatenate pooled vectors (missing ones filled) and classify with an MLP."""

    def __init__(self, cfg: EarlyFusionConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None):
        super().__init__(cfg, spec, backbones)
        self.norms = nn.ModuleDict({m: nn.LayerNorm(self.width[m]) for m in spec.modalities})
        self.net = mlp(sum(self.width.values()), cfg.hidden, spec.n_classes, cfg.dropout)

    def train_keep(self, batch: FeatureBatch) -> torch.Tensor:
        return batch.present

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        keep = self.train_keep(batch) if self.training else batch.present
        vecs = self.filled(batch, keep)
        x = torch.cat([self.norms[m](vecs[m]) for m in self.spec.modalities], dim=-1)
        return HeadOutput(self.net(x), self.zero(x))


@register_head(ModalityDropoutConfig)
class ModalityDropout(EarlyFusion):
    """Early fusion trained with modality dropout: each present modality is zeroed with prob p (never all)."""

    def train_keep(self, batch: FeatureBatch) -> torch.Tensor:
        return sample_keep_mask(batch.present, self.cfg.p)


@register_head(LateFusionConfig)
class LateFusion(_FillMixin):
    """One classifier per modality on its pooled vector; logits averaged over the present modalities
    (``late_average="present"``, as SRMM fuses, 004 §III-B), or over all of them with a missing one's branch fed
    its fill (``"all"``, the zero-fill variant)."""

    def __init__(self, cfg: LateFusionConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None):
        super().__init__(cfg, spec, backbones)
        self.branches = nn.ModuleDict({
            m: nn.Sequential(nn.LayerNorm(self.width[m]), mlp(self.width[m], cfg.hidden, spec.n_classes,
                                                             cfg.dropout))
            for m in spec.modalities})

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        vecs = self.filled(batch, batch.present)
        logits = torch.stack([self.branches[m](vecs[m]) for m in self.spec.modalities])
        fused = logits.mean(0) if self.cfg.late_average == "all" else present_mean(logits, batch.present)
        return HeadOutput(fused, self.zero(fused))
