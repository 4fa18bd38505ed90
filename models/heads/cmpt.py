"""CMPT, Cross-Modal Proxy Tokens: each modality's stream also predicts the other modalities' CLS features."""
from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import DEFAULT_TARGETS, apply_lora
from .base import FeatureBatch, Head, HeadConfig, HeadOutput, ModalitySpec, pool_tokens, register_head, usable


class EncoderBlocks(Protocol):
    """What ``stores`` hands CMPT for the faithful path: the frozen encoder's transformer blocks.
    ``forward(x [B, T, D], mask [B, T] bool) -> [B, T, D]`` over embedding-layer tokens."""

    hidden_size: int
    lora_targets: tuple[str, ...]

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


class CMPTConfig(HeadConfig):
    """``backbone``: "encoder" runs the encoder's own transformer blocks (frozen, rank-``lora_rank`` LoRA on
    q,k,v,o) over cached embedding-layer tokens (the faithful path, Hugging Face transformers encoders);
    "trainable_block" runs cached output tokens through a small trainable transformer block, the variant for
    encoders with no torch transformer blocks (EfficientNet-Lite0, CTranslate2 Whisper); "auto" picks
    "encoder" wherever the store provides blocks."""

    name: Literal["cmpt"] = "cmpt"
    backbone: Literal["auto", "encoder", "trainable_block"] = "auto"
    lora_rank: int = 1
    lora_alpha: float = 1.0
    lam: float = 0.2
    d_model: int = 256
    max_tokens: int = 32  # trainable-block streams pool cached tokens (mask-aware) to at most this many
    block_layers: int = 1
    n_heads: int = 4
    dropout: float = 0.1
    attn_dropout: float = 0.0


class TrainableBlock(nn.Module):
    """The 'trainable_block' stream: linear input map and a small transformer encoder."""

    def __init__(self, d_in: int, d: int, layers: int, heads: int, dropout: float, attn_dropout: float = 0.0):
        super().__init__()
        self.hidden_size = d
        self.inp = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout, batch_first=True, norm_first=True)
        layer.self_attn.dropout = attn_dropout
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.inp(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.blocks(x, src_key_padding_mask=~mask)


@register_head(CMPTConfig)
class CMPT(Head):
    needs_backbones = True

    def __init__(self, cfg: CMPTConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None):
        super().__init__(cfg, spec)
        mods, backbones = spec.modalities, backbones or {}
        if cfg.backbone == "encoder" and (missing := [m for m in mods if m not in backbones]):
            raise ValueError(f"backbone='encoder' but no encoder blocks for {missing} (CNN or CTranslate2 "
                             "encoders have none; use backbone='trainable_block' or 'auto')")
        self.variant: dict[str, str] = {}
        self.streams = nn.ModuleDict()
        for m in mods:
            if cfg.backbone != "trainable_block" and m in backbones:
                blocks = backbones[m]
                apply_lora(blocks, getattr(blocks, "lora_targets", DEFAULT_TARGETS), cfg.lora_rank, cfg.lora_alpha)
                self.streams[m], self.variant[m] = blocks, "encoder+lora"
            else:
                self.streams[m] = TrainableBlock(spec.tok_dim[m], cfg.d_model, cfg.block_layers, cfg.n_heads,
                                                 cfg.dropout, cfg.attn_dropout)
                self.variant[m] = "trainable_block"
        width = {m: self.streams[m].hidden_size for m in mods}
        self.pairs = [(j, i) for j in mods for i in mods if i != j]  # proxy in stream j stands in for modality i
        self.cls_tok = nn.ParameterDict({m: nn.Parameter(torch.randn(width[m]) * 0.02) for m in mods})
        self.proxy_tok = nn.ParameterDict({f"{j}_to_{i}": nn.Parameter(torch.randn(width[j]) * 0.02)
                                           for j, i in self.pairs})
        self.cls_out = nn.ModuleDict({m: nn.Linear(width[m], cfg.d_model) for m in mods})
        self.proxy_out = nn.ModuleDict({f"{j}_to_{i}": nn.Linear(width[j], cfg.d_model) for j, i in self.pairs})
        self.classifier = nn.Linear(cfg.d_model, spec.n_classes)

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(sorted({"emb" if v == "encoder+lora" else "tok" for v in self.variant.values()}))

    def run_stream(self, m: str, batch: FeatureBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CLS feature [B, d] and proxy features {i: [B, d]} of modality m's stream."""
        stream = self.streams[m]
        if self.variant[m] == "encoder+lora":
            x, mask = batch.emb[m], batch.emb_mask[m]
        else:
            x, mask = pool_tokens(batch.tok[m], batch.tok_mask[m], self.cfg.max_tokens)
            x = stream.embed(x)
        targets = [i for j, i in self.pairs if j == m]
        extra = [self.cls_tok[m]] + [self.proxy_tok[f"{m}_to_{i}"] for i in targets]
        lead = torch.stack(extra).to(x.dtype).expand(x.shape[0], -1, -1)
        h = stream(torch.cat([lead, x], 1), torch.cat([torch.ones(lead.shape[:2], dtype=torch.bool,
                                                                     device=mask.device), mask], 1))
        proxies = {i: self.proxy_out[f"{m}_to_{i}"](h[:, 1 + k]) for k, i in enumerate(targets)}
        return self.cls_out[m](h[:, 0]), proxies

    def drop_on_complete(self, present: torch.Tensor) -> torch.Tensor:
        """Modality dropout on complete rows: keep all, or drop one modality, uniformly."""
        M = present.shape[1]
        choice = torch.randint(0, M + 1, (present.shape[0],), device=present.device)
        drop = F.one_hot(choice, M + 1)[:, 1:].bool() & present.all(1, keepdim=True)
        return present & ~drop

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        mods, present = self.spec.modalities, batch.present
        keep = usable(self.drop_on_complete(present) if self.training else present)
        cls, proxy = {}, {}
        for m in mods:
            cls[m], proxy[m] = self.run_stream(m, batch)
        fused, aux = 0, self.zero(cls[mods[0]])
        complete = present.all(1)
        for idx, i in enumerate(mods):
            sources = [j for j in mods if j != i]
            w = torch.stack([keep[:, mods.index(j)] for j in sources], 1).float() if sources else None
            if sources:
                stand_in = (torch.stack([proxy[j][i] for j in sources], 1) * w.unsqueeze(-1)).sum(1) \
                    / w.sum(1, keepdim=True).clamp_min(1)
                if complete.any():  # proxy(j) -> CLS(i), on complete samples only
                    aux = aux + sum(F.mse_loss(proxy[j][i][complete].float(), cls[i][complete].detach().float())
                                    for j in sources)
            else:
                stand_in = cls[i]
            fused = fused + torch.where(keep[:, idx, None], cls[i], stand_in)
        return HeadOutput(self.classifier(fused), self.cfg.lam * aux)
