"""A frozen encoder's transformer blocks as a LoRA-tuned stream over its cached embedding-layer tokens: CMPT's
streams (001 §3, Eq. 1-3), and the LoRA oracle and LoRA baselines that run the same stream without proxies."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..lora import DEFAULT_TARGETS, LoRASettings, apply_lora
from .base import trim_padding


class EncoderBlocks(Protocol):
    """What ``stores`` hands CMPT for the faithful path: the frozen encoder's transformer blocks.
    ``forward(x [B, T, D], mask [B, T] bool) -> [B, T, D]`` over embedding-layer tokens. ``cls_token`` says
    where the encoder's own class token sits in those tokens: "first" (position 0: BERT, ViT, CLIP vision, AST),
    "eos" (the last real token, which CLIP text pools; causal blocks) or "none" (Whisper encoder, wav2vec2)."""

    hidden_size: int
    lora_targets: tuple[str, ...]
    cls_token: str

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


def class_token_output(h: torch.Tensor, mask: torch.Tensor, source: str) -> torch.Tensor:
    """The stream's class-token output [B, w] from its output tokens ``h`` over input tokens with ``mask`` (the
    first ``mask.shape[1]`` positions of ``h``): position 0 ("first", "learned"), the last real token ("eos",
    right-padded CLIP text) or the mask-aware mean ("none": Whisper encoder, wav2vec2)."""
    if source in ("learned", "first"):
        return h[:, 0]
    if source == "eos":
        return h[torch.arange(h.shape[0], device=h.device), (mask.sum(1) - 1).clamp_min(0)]
    w = mask.unsqueeze(-1).to(h.dtype)
    return (h[:, : mask.shape[1]] * w).sum(1) / w.sum(1).clamp_min(1)


def lora_stream(blocks: nn.Module, cfg: LoRASettings) -> tuple[nn.Module, str]:
    """The encoder's frozen blocks with LoRA adapters, and where their class token sits."""
    apply_lora(blocks, getattr(blocks, "lora_targets", DEFAULT_TARGETS), cfg.lora_rank, cfg.lora_alpha,
               cfg.lora_dropout)
    return blocks, getattr(blocks, "cls_token", "first")


def stream_class_token(stream: nn.Module, source: str, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The class-token output [B, w] of ``stream`` run alone (no proxy tokens) over a modality's cached
    embedding-layer tokens, skipping the batch's all-padding tail: the LoRA oracle's and LoRA baselines' input."""
    x, mask = trim_padding(emb, mask)
    return class_token_output(stream(x, mask), mask, source)
