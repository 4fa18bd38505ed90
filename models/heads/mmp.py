"""MMP, Masked Modality Projection: learn to project available modalities' tokens into missing ones."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..head_configs import MMPConfig
from .base import (FeatureBatch, Head, HeadOutput, ModalitySpec, batch_keep_mask, mlp, pool_tokens,
                   register_head, sample_keep_mask, usable)


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

    Deviations forced by frozen cached features (named in ``variant``): the tokens are the frozen encoder's
    cached OUTPUT tokens (mask-aware pooled to ``max_tokens``), not embedding-layer tokens fed on through a
    fine-tuned backbone (Eq. 1), and a small fusion transformer with a CLS token classifies them."""

    inputs = ("tok",)

    def __init__(self, cfg: MMPConfig, spec: ModalitySpec):
        super().__init__(cfg, spec)
        mods, d = spec.modalities, cfg.d_model
        tlen = {m: min(spec.tok_len[m], cfg.max_tokens) for m in mods}  # after pool_tokens
        self.inp = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(spec.tok_dim[m]), nn.Linear(spec.tok_dim[m], d))
                                  for m in mods})
        self.agg = nn.ParameterDict({m: nn.Parameter(torch.randn(cfg.n_agg, d) * 0.02) for m in mods})
        self.agg_update = nn.ModuleDict({m: _attn(d, cfg.n_heads, cfg.attn_dropout) for m in mods})
        self.agg_query = nn.ModuleDict({m: _attn(d, cfg.n_heads, cfg.attn_dropout) for m in mods})
        self.tok_attend = nn.ModuleDict({m: _attn(d, cfg.n_heads, cfg.attn_dropout) for m in mods})
        self.len_map = nn.ModuleDict({f"{j}_to_{i}": nn.Linear(tlen[j], tlen[i])
                                      for i in mods for j in mods if i != j})
        others = max(len(mods) - 1, 1)
        self.out = nn.ModuleDict({m: mlp(others * d, 2 * d, spec.tok_dim[m], cfg.dropout) for m in mods})
        self.type_emb = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in mods})
        self.pos_emb = nn.ParameterDict({m: nn.Parameter(torch.randn(tlen[m], d) * 0.02) for m in mods})
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 2 * d, cfg.dropout, batch_first=True, norm_first=True)
        layer.self_attn.dropout = cfg.attn_dropout
        self.fusion = nn.TransformerEncoder(layer, cfg.fusion_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, spec.n_classes)
        self.variant = {"tokens": "frozen_output_tokens+fusion_transformer"}

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
        pooled = {m: pool_tokens(batch.tok[m], batch.tok_mask[m], self.cfg.max_tokens) for m in mods}
        tok = {m: pooled[m][0] for m in mods}
        mask = {m: pooled[m][1] for m in mods}
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
        seq = [self.cls.expand(batch.size, -1, -1)]
        seq += [self.inp[m](tok[m]) + self.pos_emb[m] + self.type_emb[m] for m in mods]
        keys = torch.cat([torch.ones(batch.size, 1, dtype=torch.bool, device=present.device)] + [mask[m] for m in mods], 1)
        h = self.fusion(torch.cat(seq, 1), src_key_padding_mask=~keys)
        aux = torch.stack(align).mean() if align else self.zero(h)
        return HeadOutput(self.classifier(self.norm(h[:, 0])), self.cfg.align_weight * aux)
