"""MMP, Masked Modality Projection: learn to project available modalities' tokens into missing ones."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..head_configs import MMPConfig
from .base import (FeatureBatch, Head, HeadOutput, ModalitySpec, batch_keep_mask, mlp, pool_tokens,
                   register_head, sample_keep_mask, trim_padding, usable)
from .streams import lora_stream


def _attn(d: int, heads: int, dropout: float) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)


@register_head(MMPConfig)
class MMP(Head):
    """MMP (paper 000 §III). Training masks each present modality with prob ``mask_p`` = 0.5 (§III-A), never all
    of a sample's modalities: one draw per sample (``mask_per="sample"``, a named deviation) or, as §III-A does
    ("at each iteration"), one draw for the whole batch (``mask_per="batch"``). For a masked modality i and
    each available j: j's ``n_agg`` = 8 aggregated tokens cross-attend to j's tokens (Eq. 2); i's aggregated
    tokens cross-attend to those (Eq. 3); j's tokens cross-attend to the result (Eq. 4); a linear map over the
    token axis gives i's token count and an MLP over the concatenation across j yields i's tokens in i's own
    feature space (Eq. 5, §III-C; unavailable j contribute zeros so the MLP input keeps one size). The projection is aligned to the real tokens with
    Smooth-L1 averaged over the masked modalities (Eq. 6) and added to the task loss (Eq. 7, ``align_weight``
    = 1). Projected tokens replace missing ones, in training and at inference.

    ``backbone="frozen_output"``, deviations forced by frozen cached features (named in ``variant``): the tokens
    are the frozen encoder's cached OUTPUT tokens (mask-aware pooled to ``max_tokens``), not embedding-layer
    tokens fed on through a fine-tuned backbone (Eq. 1), and a small fusion transformer with a CLS token
    classifies them.

    ``backbone="encoder+lora"`` (000 §III-B as written): for each modality whose encoder has transformer blocks,
    ``T_i`` is its cached embedding-layer tokens (Eq. 1); Eq. 2-5 project a masked one from the available ones in
    that space (Eq. 6 aligns them there), and its tokens, real or projected, run through the frozen blocks with
    LoRA (its "respective branch") before the fusion transformer. Named deviations: "lora" (000 trains the
    backbone; here rank-``lora_rank`` adapters on frozen blocks, as CMPT's streams), "per_modality_encoders"
    (000's ViLT is one stream over both modalities; here each modality has its own encoder, fused by the
    transformer above), and "frozen_output_tokens=<modalities>" for modalities without blocks (CNNs), which keep
    the frozen variant's path."""

    needs_backbones = True

    def __init__(self, cfg: MMPConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None):
        super().__init__(cfg, spec)
        mods, d = spec.modalities, cfg.d_model
        if cfg.backbone == "encoder+lora" and not backbones:
            raise ValueError("mmp backbone='encoder+lora' but no modality has encoder blocks (CNN encoders have "
                             "none; use backbone='frozen_output')")
        blocks = backbones if cfg.backbone == "encoder+lora" else {}
        # the projection's token space: embedding-layer tokens for a modality run through its blocks, else the
        # pooled frozen output tokens; the fusion transformer's: output tokens pooled to max_tokens either way
        src_dim = {m: spec.emb_dim[m] if m in blocks else spec.tok_dim[m] for m in mods}
        self.src_len = {m: spec.emb_len[m] if m in blocks else min(spec.tok_len[m], cfg.max_tokens) for m in mods}
        tlen = {m: min(spec.emb_len[m] if m in blocks else spec.tok_len[m], cfg.max_tokens) for m in mods}
        self.inp = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(src_dim[m]), nn.Linear(src_dim[m], d))
                                  for m in mods})
        self.agg = nn.ParameterDict({m: nn.Parameter(torch.randn(cfg.n_agg, d) * 0.02) for m in mods})
        self.agg_update = nn.ModuleDict({m: _attn(d, cfg.n_heads, cfg.attn_dropout) for m in mods})
        self.agg_query = nn.ModuleDict({m: _attn(d, cfg.n_heads, cfg.attn_dropout) for m in mods})
        self.tok_attend = nn.ModuleDict({m: _attn(d, cfg.n_heads, cfg.attn_dropout) for m in mods})
        self.len_map = nn.ModuleDict({f"{j}_to_{i}": nn.Linear(self.src_len[j], self.src_len[i])
                                      for i in mods for j in mods if i != j})
        others = max(len(mods) - 1, 1)
        self.out = nn.ModuleDict({m: mlp(others * d, 2 * d, src_dim[m], cfg.dropout) for m in mods})
        self.type_emb = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in mods})
        self.pos_emb = nn.ParameterDict({m: nn.Parameter(torch.randn(tlen[m], d) * 0.02) for m in mods})
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 2 * d, cfg.dropout, batch_first=True, norm_first=True)
        layer.self_attn.dropout = cfg.attn_dropout
        self.fusion = nn.TransformerEncoder(layer, cfg.fusion_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, spec.n_classes)
        self.streams = nn.ModuleDict({m: lora_stream(b, cfg)[0] for m, b in blocks.items()})
        self.stream_in = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(s.hidden_size), nn.Linear(s.hidden_size, d))
                                        for m, s in self.streams.items()})
        if not self.streams:
            self.variant = {"tokens": "frozen_output_tokens+fusion_transformer"}
        else:
            frozen = "/".join(m for m in mods if m not in self.streams)
            self.variant = {"tokens": "embedding_layer_tokens+fusion_transformer", "backbone": "encoder+lora",
                            "streams": "+".join(self.streams),
                            "deviation": "+".join(["lora", "per_modality_encoders"]
                                                  + [f"frozen_output_tokens={frozen}"] * bool(frozen))}

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        if not self.streams:
            return ("tok",)
        return ("emb", "tok") if len(self.streams) < len(self.spec.modalities) else ("emb",)

    def source_tokens(self, batch: FeatureBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each modality's tokens in the projection's space (``src_len`` long) and their masks."""
        tok, mask = {}, {}
        for m in self.spec.modalities:
            if m in self.streams:  # padded to the store's longest, which Eq. 5's token-count map is built for
                pad = self.src_len[m] - batch.emb[m].shape[1]
                tok[m], mask[m] = F.pad(batch.emb[m], (0, 0, 0, pad)), F.pad(batch.emb_mask[m], (0, pad))
            else:
                tok[m], mask[m] = pool_tokens(batch.tok[m], batch.tok_mask[m], self.cfg.max_tokens)
        return tok, mask

    def fusion_tokens(self, m: str, tok: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Modality m's tokens for the fusion transformer, in ``d_model``: a stream's output tokens over ``tok``
        (the batch's all-padding tail skipped, then padded back so that pooling windows stay put) pooled to
        ``max_tokens``, or the frozen tokens themselves."""
        if m not in self.streams:
            return self.inp[m](tok), mask
        x, xm = trim_padding(tok, mask)
        h = F.pad(self.streams[m](x, xm), (0, 0, 0, tok.shape[1] - x.shape[1]))
        h, mask = pool_tokens(h, mask, self.cfg.max_tokens)
        return self.stream_in[m](h), mask

    def project(self, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], avail: torch.Tensor,
                targets: list[str]) -> dict[str, torch.Tensor]:
        """Projected tokens [B, T_i, D_i] for each target modality i from the available others."""
        mods, B = self.spec.modalities, avail.shape[0]
        upd = {j: self.agg_update[j](self.agg[j].expand(B, -1, -1), x[j], x[j], key_padding_mask=~mask[j],
                                     need_weights=False)[0] for j in mods}
        out = {}
        for i in targets:
            parts = []
            for jdx, j in enumerate(mods):
                if j == i:
                    continue
                z = self.agg_query[i](self.agg[i].expand(B, -1, -1), upd[j], upd[j], need_weights=False)[0]
                p = self.tok_attend[j](x[j], z, z, need_weights=False)[0] * mask[j].unsqueeze(-1)
                p = self.len_map[f"{j}_to_{i}"](p.transpose(1, 2)).transpose(1, 2)
                parts.append(p * avail[:, jdx, None, None])
            out[i] = self.out[i](torch.cat(parts, -1) if parts else torch.zeros_like(x[i]))
        return out

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        mods, present = self.spec.modalities, batch.present
        draw = sample_keep_mask if self.cfg.mask_per == "sample" else batch_keep_mask
        keep = draw(present, self.cfg.mask_p) if self.training else present
        avail = usable(keep)
        tok, mask = self.source_tokens(batch)
        x = {m: self.inp[m](tok[m]) for m in mods}
        targets = [m for i, m in enumerate(mods) if not avail[:, i].all()]
        proj = self.project(x, mask, avail, targets)
        align = []  # Eq. 6: one Smooth-L1 term per masked modality, averaged over the masked modalities
        for i, m in enumerate(mods):
            if m not in proj:
                continue
            masked = present[:, i] & ~avail[:, i]  # real tokens exist: align the projection to them
            if masked.any():
                valid = mask[m][masked].unsqueeze(-1)
                err = F.smooth_l1_loss(proj[m][masked].float(), tok[m][masked].float(), reduction="none",
                                       beta=self.cfg.smooth_l1_beta)
                align.append((err * valid).sum() / (valid.sum() * err.shape[-1]).clamp_min(1))
            use = avail[:, i, None, None]
            tok[m] = torch.where(use, tok[m], proj[m].to(tok[m].dtype))
            mask[m] = torch.where(avail[:, i, None], mask[m], torch.ones_like(mask[m]))
        fused = {m: self.fusion_tokens(m, tok[m], mask[m]) for m in mods}
        seq = [self.cls.expand(batch.size, -1, -1)]
        seq += [fused[m][0] + self.pos_emb[m] + self.type_emb[m] for m in mods]
        keys = torch.cat([torch.ones(batch.size, 1, dtype=torch.bool, device=present.device)]
                         + [fused[m][1] for m in mods], 1)
        h = self.fusion(torch.cat(seq, 1), src_key_padding_mask=~keys)
        aux = torch.stack(align).mean() if align else self.zero(h)
        return HeadOutput(self.classifier(self.norm(h[:, 0])), self.cfg.align_weight * aux)
