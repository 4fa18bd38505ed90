"""Low-rank adapters on frozen linear layers (used by CMPT on the encoder's q, k, v, o projections)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .head_configs import LoRASettings  # noqa: F401  (re-exported)

# Suffixes of attention projections in common Hugging Face architectures (BERT/ViT/AST, CLIP/Whisper/wav2vec2).
DEFAULT_TARGETS = ("query", "key", "value", "attention.output.dense", "q_proj", "k_proj", "v_proj", "out_proj",
                   "o_proj")


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A dropout(x) with W frozen (Hu et al. 2022, dropout on the adapter input as in
    peft); B starts at zero so training starts from the base model. Dropout is active in training mode only."""

    def __init__(self, base: nn.Linear, rank: int = 1, alpha: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype) * self.scale


def apply_lora(module: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS, rank: int = 1,
               alpha: float = 1.0, dropout: float = 0.0) -> list[str]:
    """Freeze ``module`` and wrap every nn.Linear whose qualified name ends with a target suffix."""
    module.requires_grad_(False)
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no linear layer matches LoRA targets {targets}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return names
