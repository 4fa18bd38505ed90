"""Head interface and registry: every head maps a FeatureBatch to logits plus an auxiliary loss."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
from torch import nn

from ..head_configs import HEAD_CONFIGS, HeadConfig, parse_head_config  # noqa: F401  (re-exported)

Inputs = Literal["vec", "tok", "emb"]


@dataclass
class ModalitySpec:
    """Shapes the head is built for; read from the feature store's metadata."""

    modalities: list[str]
    vec_dim: dict[str, int]
    tok_dim: dict[str, int]
    tok_len: dict[str, int]
    n_classes: int
    task: Literal["multiclass", "multilabel", "binary"] = "multiclass"
    emb_dim: dict[str, int] = field(default_factory=dict)
    emb_len: dict[str, int] = field(default_factory=dict)
    placeholder_vec: dict[str, torch.Tensor] = field(default_factory=dict)


TENSOR_DICTS = ("vec", "tok", "tok_mask", "emb", "emb_mask")  # FeatureBatch's per-modality tensor fields


@dataclass
class FeatureBatch:
    """A batch of cached features. Missing modalities already hold the encoder's placeholder features;
    ``present`` [B, M] says which are real. Token tensors come with boolean masks (True = real token)."""

    present: torch.Tensor
    y: torch.Tensor
    vec: dict[str, torch.Tensor] = field(default_factory=dict)
    tok: dict[str, torch.Tensor] = field(default_factory=dict)
    tok_mask: dict[str, torch.Tensor] = field(default_factory=dict)
    emb: dict[str, torch.Tensor] = field(default_factory=dict)
    emb_mask: dict[str, torch.Tensor] = field(default_factory=dict)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FeatureBatch":
        """A new batch with ``fn`` applied to every tensor."""
        return FeatureBatch(fn(self.present), fn(self.y),
                            *({k: fn(v) for k, v in getattr(self, f).items()} for f in TENSOR_DICTS))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by a flat name: ``present``, ``y`` and ``<field>__<modality>``."""
        return {"present": self.present, "y": self.y,
                **{f"{f}__{m}": t for f in TENSOR_DICTS for m, t in getattr(self, f).items()}}

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor]) -> "FeatureBatch":
        """The inverse of ``tensors``."""
        batch = cls(named["present"], named["y"])
        for name, t in named.items():
            if "__" in name:
                f, m = name.split("__", 1)
                getattr(batch, f)[m] = t
        return batch

    def to(self, device: torch.device | str) -> "FeatureBatch":
        """Move to ``device``; cached float16 features become float32 there (autocast picks bf16 on GPU)."""
        async_copy = torch.device(device).type == "cuda"
        return self.map(lambda t: t.to(device, torch.float32 if t.is_floating_point() else None,
                                       non_blocking=async_copy))

    @property
    def size(self) -> int:
        return self.present.shape[0]


@dataclass
class HeadOutput:
    """``logits`` [N, C]; ``aux_loss`` is added to the task loss; ``target_index`` maps logits rows to batch
    rows when a head emits several examples per sample in training (None: one row per sample, in order);
    ``stats``: scalars the head reports in training, averaged per epoch into its history (``train/<name>``)."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    target_index: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Head(nn.Module):
    """Base class. Subclasses declare the cached inputs they read and implement ``forward``."""

    inputs: ClassVar[tuple[Inputs, ...]] = ("vec",)

    def __init__(self, cfg: HeadConfig, spec: ModalitySpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec

    def zero(self, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(())

    def forward(self, batch: FeatureBatch) -> HeadOutput:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class HeadEntry:
    config_cls: type[HeadConfig]
    build: Callable[..., Head]


HEADS: dict[str, HeadEntry] = {}


def register_head(config_cls: type[HeadConfig]) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: ``@register_head(MyConfig)`` makes ``name`` from MyConfig's default available."""

    def deco(cls: type[Head]) -> type[Head]:
        name = config_cls.model_fields["name"].default
        if name in HEADS:
            raise ValueError(f"head {name!r} registered twice")
        if HEAD_CONFIGS.get(name) is not config_cls:  # a config class registers itself (models.head_configs)
            raise ValueError(f"{config_cls.__qualname__} is not the registered config of head {name!r}")
        HEADS[name] = HeadEntry(config_cls, cls)
        return cls

    return deco


def build_head(cfg: HeadConfig, spec: ModalitySpec, backbones: dict[str, nn.Module] | None = None) -> Head:
    head_cls = HEADS[cfg.name].build
    return head_cls(cfg, spec, backbones=backbones) if getattr(head_cls, "needs_backbones", False) \
        else head_cls(cfg, spec)


def sample_keep_mask(present: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly drop present modalities with probability p each, never dropping every present one."""
    drop = torch.rand(present.shape, device=present.device, generator=generator) < p
    keep = present & ~drop
    dead = ~keep.any(1) & present.any(1)
    if dead.any():
        # restore one random present modality in rows that lost all
        rows = present[dead]
        scores = (torch.rand(rows.shape, device=present.device, generator=generator) + 1e-6) * rows
        keep[dead] = torch.nn.functional.one_hot(scores.argmax(1), present.shape[1]).bool()
    return keep


def batch_keep_mask(present: torch.Tensor, p: float) -> torch.Tensor:
    """One draw for the whole batch (000 §III-A: each modality available or masked at each iteration): each
    modality dropped with probability p, never all; rows the draw would leave with nothing keep what they have."""
    keep = present & sample_keep_mask(torch.ones_like(present[:1]), p)
    return torch.where(keep.any(1, keepdim=True), keep, present)


def usable(present: torch.Tensor) -> torch.Tensor:
    """Presence used for fusion: rows with nothing present fall back to every modality's placeholder."""
    return present | ~present.any(1, keepdim=True)


def present_mean(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [M, B, C] over the modalities present in each row (``present`` [B, M]; ``usable``: a row
    with none averages them all)."""
    w = usable(present).T.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(0) / w.sum(0)


def trim_padding(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing token columns that are padding in every row of the batch (at least one column stays).
    Masked attention gives the real tokens the same outputs with or without them; a batch of Fashion titles is
    padded to the longest title in the store (27 tokens) but its own longest averages 20."""
    real = mask.any(0).nonzero()
    keep = int(real[-1]) + 1 if len(real) else 1
    return (x, mask) if keep == x.shape[1] else (x[:, :keep], mask[:, :keep])


def pool_tokens(x: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-aware average pooling of the token axis down to at most ``max_tokens`` windows."""
    T = x.shape[1]
    if T <= max_tokens:
        return x, mask
    w = -(-T // max_tokens)  # window size, ceil
    pad = w * max_tokens - T
    m = torch.nn.functional.pad(mask, (0, pad)).view(x.shape[0], max_tokens, w, 1).to(x.dtype)
    xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(x.shape[0], max_tokens, w, -1)
    count = m.sum(2)
    return (xs * m).sum(2) / count.clamp_min(1), count.squeeze(-1) > 0


def mlp(d_in: int, d_hidden: int, d_out: int, dropout: float = 0.1) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))
