"""Baselines every paper compares with: zero-fill early fusion, zero-fill late fusion, modality dropout; each on
the frozen pooled vectors or, as this project's "encoder+lora" extension, on LoRA-tuned encoder streams."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..lora import LoRASettings
from .base import FeatureBatch, Head, HeadConfig, HeadOutput, ModalitySpec, mlp, register_head, sample_keep_mask
from .streams import lora_stream, stream_class_token


class _FusionConfig(HeadConfig, LoRASettings):
    """``backbone``: "pooled_vector" (the papers' baselines) reads each modality's frozen pooled vector;
    "encoder+lora" (this project's extension, label ``<name>-lora``) replaces it, for every modality whose
    encoder has transformer blocks, by the class-token output of those blocks with LoRA, CMPT's stream exactly
    (same rank, alpha, dropout, class token): the baseline fine-tuned as much as CMPT is, so that a comparison
    with CMPT measures its proxy tokens and not its fine-tuning, as 001 §4.6.1's ablation (ii) does (modality
    dropout on the same LoRA-tuned encoders). Modalities without blocks keep the pooled vector."""

    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    fill: Literal["placeholder", "zeros"] = "zeros"
    backbone: Literal["pooled_vector", "encoder+lora"] = "pooled_vector"

    @property
    def label(self) -> str:
        return self.name + ("-lora" if self.backbone == "encoder+lora" else "")

    @property
    def encoder_blocks(self) -> str:
        return "optional" if self.backbone == "encoder+lora" else "none"


class _FillMixin(Head):
    """Feeds missing or dropped modalities as zeros ("zeros", classic zero-fill) or as the frozen encoder's
    embedding of the empty input ("placeholder", from the store; pooled vectors only)."""

    needs_backbones = True

    def __init__(self, cfg: _FusionConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None):
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


class EarlyFusionConfig(_FusionConfig):
    name: Literal["early"] = "early"


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

    def __init__(self, cfg: LateFusionConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None):
        super().__init__(cfg, spec, backbones)
        self.branches = nn.ModuleDict({
            m: nn.Sequential(nn.LayerNorm(self.width[m]), mlp(self.width[m], cfg.hidden, spec.n_classes,
                                                             cfg.dropout))
            for m in spec.modalities})

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        vecs = self.filled(batch, batch.present)
        logits = torch.stack([self.branches[m](vecs[m]) for m in self.spec.modalities]).mean(0)
        return HeadOutput(logits, self.zero(logits))
