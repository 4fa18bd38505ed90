"""Turn a split's cached features into the batches a head sees under a missing pattern (pure torch)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from .heads.base import FeatureBatch


def take(data: "FeatureBatch | MaskedSplit", idx: torch.Tensor) -> "FeatureBatch | MaskedSplit":
    """Rows ``idx`` of ``data``, of the same kind: a FeatureBatch's rows gathered (``idx`` follows the data to its
    device), a MaskedSplit's rows selected (``MaskedSplit.subset``: nothing gathered until a batch is built)."""
    if isinstance(data, MaskedSplit):
        return data.subset(idx)
    idx = idx.to(data.present.device)
    if data.present.device.type != "cpu":
        return data.map(lambda t: t.index_select(0, idx))
    rows = idx.numpy()
    return data.map(lambda t: _take_rows(t, rows, idx))


def _take_rows(t: torch.Tensor, rows: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
    """numpy's row gather on CPU: 3-10x faster than ``index_select`` on the float16 token tensors (and on the
    memory-mapped split cache), same values; bfloat16, which numpy lacks, keeps ``index_select``."""
    if t.dtype == torch.bfloat16 or t.requires_grad:
        return t.index_select(0, idx)
    return torch.from_numpy(np.take(t.numpy(), rows, axis=0))


def apply_presence(data: FeatureBatch, present: torch.Tensor, placeholder: FeatureBatch,
                   modalities: list[str]) -> FeatureBatch:
    """Mark modalities absent where ``present`` is False and swap in the encoder's placeholder features there.
    Rows already missing in the source data stay missing."""
    present = present & data.present
    out = FeatureBatch(present, data.y)
    for i, m in enumerate(modalities):
        gone = ~present[:, i]
        for f in FIELDS:
            src, ph = getattr(data, f), getattr(placeholder, f)
            if m not in src:
                continue
            shape = (-1,) + (1,) * (src[m].dim() - 1)
            getattr(out, f)[m] = torch.where(gone.view(shape), ph[m].to(src[m].dtype), src[m])
    return out


FIELDS = ("vec", "tok", "tok_mask", "emb", "emb_mask")


@dataclass
class MaskedSplit:
    """A split under a missing pattern, built batch by batch: ``data`` (the split's features, typically the
    memory-mapped split cache) is never copied or written; each batch gathers its rows and applies ``keep`` (the
    pattern's presence mask for every row of ``data``, [N, M]) to them alone, placeholders in for the inputs it
    drops: the values ``apply_presence`` gives the same rows. ``rows``: the rows of ``data`` it holds, in order
    (None: all of them)."""

    data: FeatureBatch
    keep: torch.Tensor
    placeholder: FeatureBatch
    modalities: list[str]
    rows: torch.Tensor | None = None
    # called after each batch is gathered: the store passes one that drops a memory-mapped ``data``'s resident
    # pages, so a pass over a split does not keep all of it mapped in the process. Not every few batches: the
    # page cache maps large folios, and 128 random rows of a token split already map ~40 MB of it
    release: Callable[[], None] | None = None
    _arrays: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)  # for _gather
    _fill: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    @property
    def size(self) -> int:
        return self.data.size if self.rows is None else len(self.rows)

    @property
    def present(self) -> torch.Tensor:
        """[N, M] presence under the pattern (the masks, not the features, so small)."""
        return self._pick(self.keep & self.data.present)

    @property
    def y(self) -> torch.Tensor:
        return self._pick(self.data.y)

    def _pick(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows.to(t.device)]

    def batch(self, sel: slice | torch.Tensor) -> FeatureBatch:
        """Rows ``sel`` (a slice, or positions in this split) under the pattern."""
        idx = torch.arange(self.size)[sel] if isinstance(sel, slice) else sel.cpu()
        idx = idx if self.rows is None else self.rows.cpu()[idx]
        if self._arrays is None:
            self._arrays = self._numpy_arrays()
        if self._arrays:
            return self._gather(idx.numpy())
        idx = idx.to(self.data.present.device)  # on a GPU (or bfloat16): torch's gather and apply_presence
        return apply_presence(take(self.data, idx), self.keep.to(idx.device)[idx], self.placeholder, self.modalities)

    def _numpy_arrays(self) -> dict[str, np.ndarray]:
        """``data``'s arrays as numpy (the masked presence among them), each feature's placeholder row kept
        beside them, for ``_gather``; none on a GPU or for bfloat16, which numpy lacks."""
        tensors = self.data.tensors()
        if any(t.device.type != "cpu" or t.dtype == torch.bfloat16 for t in tensors.values()):
            return {}
        self._fill = {f"{f}__{m}": getattr(self.placeholder, f)[m].to(t.dtype).numpy()[0]
                      for f in FIELDS for m, t in getattr(self.data, f).items()}
        return {k: t.numpy() for k, t in tensors.items()} | {"present": (self.keep & self.data.present).numpy()}

    def _gather(self, rows: np.ndarray) -> FeatureBatch:
        """``rows`` of ``data`` under the pattern, in numpy (no torch call per tensor and batch, which costs more
        than the gather itself at small batch sizes): one ``np.take`` per array, then each absent input's rows of
        the gathered copy set to its placeholder row."""
        out = {k: np.take(a, rows, axis=0) for k, a in self._arrays.items()}
        if self.release is not None:
            self.release()
        for i, m in enumerate(self.modalities):
            if len(gone := np.flatnonzero(~out["present"][:, i])):
                for f in FIELDS:
                    if (name := f"{f}__{m}") in out:
                        out[name][gone] = self._fill[name]
        return FeatureBatch.from_tensors({k: torch.from_numpy(a) for k, a in out.items()})

    def whole(self) -> FeatureBatch:
        """Every row under the pattern as one FeatureBatch (a full copy)."""
        return self.batch(slice(None))

    def subset(self, idx: torch.Tensor) -> "MaskedSplit":
        return replace(self, rows=idx.cpu() if self.rows is None else self.rows[idx.cpu()])

    def on(self, data: FeatureBatch) -> "MaskedSplit":
        """The same split over ``data`` (the same rows moved to a device, e.g.), its mask and placeholder beside
        it."""
        device = data.present.device
        return replace(self, data=data, keep=self.keep.to(device), placeholder=self.placeholder.to(device))


Split = FeatureBatch | MaskedSplit  # what training and evaluation read


def batch_rows(data: Split, sel: slice | torch.Tensor) -> FeatureBatch:
    """Rows ``sel`` of ``data`` as one batch: a slice of a FeatureBatch is a view (nothing copied), positions
    are gathered; a MaskedSplit builds the batch under its pattern (``MaskedSplit.batch``)."""
    if isinstance(data, MaskedSplit):
        return data.batch(sel)
    return data.map(lambda t: t[sel]) if isinstance(sel, slice) else take(data, sel)


def add_noise(data: FeatureBatch, sigma: float, rng: np.random.Generator, modalities: list[str],
              sigma_scale: str = "absolute") -> FeatureBatch:
    """Gaussian noise N(0, sigma) on pooled vectors and tokens of ``modalities``, seeded by ``rng``.
    ``sigma_scale``: "absolute" (004 Table IX: sigma is the noise std itself) or "feature_std" (sigma times each
    feature tensor's own std, so sigma means the same for every encoder; this project's extension)."""
    if sigma_scale not in ("absolute", "feature_std"):
        raise ValueError(f"sigma_scale must be 'absolute' or 'feature_std', not {sigma_scale!r}")
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    out = FeatureBatch(data.present, data.y, dict(data.vec), dict(data.tok), data.tok_mask, dict(data.emb),
                       data.emb_mask)
    for f in ("vec", "tok", "emb"):
        feats = getattr(out, f)
        for m in modalities:
            if m in feats:
                x = feats[m].float()
                std = sigma * (x.std() if sigma_scale == "feature_std" else 1.0)
                feats[m] = (x + std * torch.randn(x.shape, generator=gen)).to(feats[m].dtype)
    return out
