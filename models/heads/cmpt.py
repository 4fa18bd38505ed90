"""CMPT, Cross-Modal Proxy Tokens: each modality's stream also predicts the other modalities' CLS features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..head_configs import CMPTConfig
from .base import (FeatureBatch, Head, HeadOutput, ModalitySpec, pool_tokens, register_head,
                   trim_padding, usable)
from .streams import class_token_output, lora_stream


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
    """Each modality m's stream gets one cross-modal proxy token per other modality i next to its class token
    (Eq. 2; proxies follow the class token, equivalent to the paper's order for bidirectional blocks since
    positions are already in the tokens, and come after every token for causal CLIP text so they see them all).
    The stream's output at the class token is CLS_m and at the proxy is CMPT_{m->i} (Eq. 3). Alignment (Eq. 4):
    MSE(CMPT_{j->i}, CLS_i) on complete samples, on the streams' final output tokens, with no stop-gradient,
    summed over ordered pairs. Gating and additive fusion (Eq. 5): a missing modality's CLS is replaced by the
    available modalities' proxies for it (their mean, this project's extension to M > 2), then a linear
    classifier (Eq. 6); loss = task + ``lam`` * align (Eq. 7). Training on complete rows keeps all modalities
    or drops one, uniformly (§3.5), per sample.

    The class token per stream (``variant``): "encoder+lora" uses the encoder's own class token at position 0
    of the cached ``emb`` tokens and adds no CLS parameter; "encoder+lora+eos_cls" (CLIP text: no class token,
    CLIP pools its end-of-text token) uses the last real token; "encoder+lora+meanpool_cls" (Whisper encoder,
    wav2vec2: no class token) uses the mask-aware mean of the stream's output tokens, as those families' own
    classification heads do; "trainable_block+learned_cls" adds a learned CLS. Named deviations:
    "trainable_block=<modalities>" for streams of that variant (no pretrained class token, no LoRA on a frozen
    encoder, and Eq. 4's target CLS_i comes from a fully trainable stream with no stop-gradient, so the MSE can
    fall by shrinking both sides; 001 §3 runs every stream through its pretrained encoder), and, where stream
    widths differ (the paper's encoders share d), "width_map" (a linear map of a proxy into its target's width
    before Eq. 4) and "fusion_proj" (per-modality linear maps to ``d_model`` before the additive fusion)."""

    needs_backbones = True
    CLS_VARIANT = {"first": "encoder+lora", "eos": "encoder+lora+eos_cls", "none": "encoder+lora+meanpool_cls",
                   "learned": "trainable_block+learned_cls"}

    def __init__(self, cfg: CMPTConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None):
        super().__init__(cfg, spec)
        mods, backbones = spec.modalities, backbones or {}
        if cfg.backbone == "encoder" and (missing := [m for m in mods if m not in backbones]):
            raise ValueError(f"backbone='encoder' but no encoder blocks for {missing} (CNN encoders "
                             "have none; use backbone='trainable_block' or 'auto')")
        self.cls_source: dict[str, str] = {}
        self.streams = nn.ModuleDict()
        for m in mods:
            if cfg.backbone != "trainable_block" and m in backbones:
                self.streams[m], self.cls_source[m] = lora_stream(backbones[m], cfg)
            else:
                self.streams[m] = TrainableBlock(spec.tok_dim[m], cfg.d_model, cfg.block_layers, cfg.n_heads,
                                                 cfg.dropout, cfg.attn_dropout)
                self.cls_source[m] = "learned"
        width = {m: self.streams[m].hidden_size for m in mods}
        self.pairs = [(j, i) for j in mods for i in mods if i != j]  # proxy in stream j stands in for modality i
        self.cls_tok = nn.ParameterDict({m: nn.Parameter(torch.randn(width[m]) * 0.02)
                                         for m in mods if self.cls_source[m] == "learned"})
        self.proxy_tok = nn.ParameterDict({f"{j}_to_{i}": nn.Parameter(torch.randn(width[j]) * 0.02)
                                           for j, i in self.pairs})
        self.width_map = nn.ModuleDict({f"{j}_to_{i}": nn.Linear(width[j], width[i])
                                        for j, i in self.pairs if width[j] != width[i]})
        d = width[mods[0]] if len(set(width.values())) == 1 else cfg.d_model
        self.fusion_proj = nn.ModuleDict({m: nn.Linear(width[m], d) for m in mods if width[m] != d})
        self.classifier = nn.Linear(d, spec.n_classes)
        self.variant: dict[str, str] = {m: self.CLS_VARIANT[self.cls_source[m]] for m in mods}
        trainable = "/".join(m for m in mods if self.cls_source[m] == "learned")
        deviations = [f"trainable_block={trainable}"] * bool(trainable) + \
            [name for name, mod in (("width_map", self.width_map), ("fusion_proj", self.fusion_proj)) if mod]
        if deviations:
            self.variant["deviation"] = "+".join(deviations)

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(sorted({"tok" if s == "learned" else "emb" for s in self.cls_source.values()}))

    def run_stream(self, m: str, batch: FeatureBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CLS output [B, w_m] and proxy outputs {i: [B, w_m]} of modality m's stream (Eq. 2-3)."""
        stream, source = self.streams[m], self.cls_source[m]
        if source == "learned":  # the variant's own CLS parameter goes first
            x, mask = pool_tokens(batch.tok[m], batch.tok_mask[m], self.cfg.max_tokens)
            x = stream.embed(x)
            x = torch.cat([self.cls_tok[m].to(x.dtype).expand(x.shape[0], 1, -1), x], 1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        else:  # the encoder's own blocks cost per token: skip the batch's all-padding tail
            x, mask = trim_padding(batch.emb[m], batch.emb_mask[m])
        B, T = x.shape[:2]
        targets = [i for j, i in self.pairs if j == m]
        proxies = torch.stack([self.proxy_tok[f"{m}_to_{i}"] for i in targets]).to(x.dtype).expand(B, -1, -1) \
            if targets else x[:, :0]
        real = torch.ones(B, proxies.shape[1], dtype=torch.bool, device=mask.device)
        if source in ("learned", "first"):  # the class token stays first, proxies right after it
            seq, seq_mask, at = torch.cat([x[:, :1], proxies, x[:, 1:]], 1), \
                torch.cat([mask[:, :1], real, mask[:, 1:]], 1), 1
        else:  # "eos" (causal) and "none": after every token
            seq, seq_mask, at = torch.cat([x, proxies], 1), torch.cat([mask, real], 1), T
        h = stream(seq, seq_mask)
        out = {i: h[:, at + k] for k, i in enumerate(targets)}
        return class_token_output(h, mask, source), out

    def proxy_in(self, j: str, i: str, proxy: torch.Tensor) -> torch.Tensor:
        """CMPT_{j->i} in modality i's width ("width_map" deviation only where the widths differ)."""
        key = f"{j}_to_{i}"
        return self.width_map[key](proxy) if key in self.width_map else proxy

    def drop_on_complete(self, present: torch.Tensor) -> torch.Tensor:
        """Modality dropout on complete rows (§3.5): keep all, or drop one modality, uniformly."""
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
        norms: dict[str, list[torch.Tensor]] = {"proxy_norm": [], "target_norm": []}
        for idx, i in enumerate(mods):
            sources = [j for j in mods if j != i]
            stand = {j: self.proxy_in(j, i, proxy[j][i]) for j in sources}
            if complete.any():  # Eq. 4: MSE(CMPT_{j->i}, CLS_i) on complete samples, no stop-gradient
                aux = aux + sum(F.mse_loss(stand[j][complete].float(), cls[i][complete].float()) for j in sources)
                if self.training:  # both sides' size: an alignment that shrinks them both shows as a collapse
                    norms["proxy_norm"] += [stand[j][complete].detach().float().norm(dim=-1).mean() for j in sources]
                    norms["target_norm"] += [cls[i][complete].detach().float().norm(dim=-1).mean()] * len(sources)
            if sources:  # Eq. 5 gating: the available modalities' proxies stand in for a missing CLS_i
                w = torch.stack([keep[:, mods.index(j)] for j in sources], 1).to(cls[i].dtype).unsqueeze(-1)
                stand_in = (torch.stack([stand[j] for j in sources], 1) * w).sum(1) / w.sum(1).clamp_min(1)
            else:
                stand_in = cls[i]
            token = torch.where(keep[:, idx, None], cls[i], stand_in)
            fused = fused + (self.fusion_proj[i](token) if i in self.fusion_proj else token)
        stats = {name: torch.stack(values).mean() for name, values in norms.items() if values}
        return HeadOutput(self.classifier(fused), self.cfg.lam * aux, stats=stats)
