"""Unimodal oracle: trained and tested on one modality only, the ceiling when the other modalities are missing."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..lora import LoRASettings
from .base import FeatureBatch, Head, HeadConfig, HeadOutput, ModalitySpec, mlp, register_head
from .streams import lora_stream, stream_class_token


class OracleConfig(HeadConfig, LoRASettings):
    """``backbone``: "pooled_vector" reads the modality's frozen pooled vector, the input of every baseline;
    "encoder+lora" fine-tunes the modality's encoder blocks with LoRA exactly as CMPT's stream does (same rank,
    alpha, dropout, class token), the ceiling to hold CMPT against, since its streams are fine-tuned too."""

    name: Literal["oracle"] = "oracle"
    modality: str | None = None  # the one modality it sees; None: the store's first modality
    backbone: Literal["pooled_vector", "encoder+lora"] = "pooled_vector"
    hidden: int = Field(256, ge=1)  # hidden and dropout: the pooled-vector MLP's (the LoRA path is linear)
    dropout: float = Field(0.1, ge=0, lt=1)

    @property
    def label(self) -> str:
        base = f"oracle-{self.modality}" if self.modality else "oracle"
        return base + ("-lora" if self.backbone == "encoder+lora" else "")

    @property
    def encoder_blocks(self) -> str:
        return "required" if self.backbone == "encoder+lora" else "none"


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
