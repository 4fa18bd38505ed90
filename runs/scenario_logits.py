"""A trained head's logits on a split under many missing patterns, each row scored once per set of modalities a
pattern keeps for it, however many patterns share that set."""
from __future__ import annotations

import numpy as np
import torch

from models.config import TrainConfig
from models.features import MaskedSplit
from models.heads import Head
from models.patterns import MissingPattern
from models.training import predict
from stores.features.scenarios import ScenarioReader


class ScenarioLogits:
    """``under(split, pattern)``: the logits ``predict`` gives for ``reader.under(split, pattern)``, and that split.

    Under a mask pattern a row's input is fixed by the modalities the pattern keeps for it: the dropped ones
    take their encoder's placeholder, the data's own missing inputs stay missing either way. A head in eval mode
    scores each row on its own, so every pattern's logits are gathered from one pass over the split per kept
    set (the grid of a two-modality store, 11 patterns, needs 3 passes; the calibration's 3 patterns reuse
    them). Each pass keeps one [rows, classes] float tensor, what one pattern's ``predict`` returns. Noise
    patterns change the features themselves and are predicted directly."""

    def __init__(self, head: Head, reader: ScenarioReader, cfg: TrainConfig):
        self.head, self.reader, self.cfg = head, reader, cfg
        self._passes: dict[tuple[str, tuple[bool, ...]], torch.Tensor] = {}
        self.passes = 0  # forward passes over a split made so far

    def under(self, split: str, pattern: MissingPattern) -> tuple[torch.Tensor, MaskedSplit]:
        data = self.reader.under(split, pattern)
        if not isinstance(data, MaskedSplit) or data.rows is not None:  # noise: features of its own
            self.passes += 1
            return predict(self.head, data, self.cfg), data
        keep = data.keep.bool().numpy()
        kept_sets, row_set = np.unique(keep, axis=0, return_inverse=True)
        row_set = row_set.reshape(-1)
        parts = [self._pass(split, data, tuple(bool(k) for k in kept)) for kept in kept_sets]
        if len(parts) == 1:
            return parts[0], data
        out = torch.empty_like(parts[0])
        for i, logits in enumerate(parts):
            rows = torch.from_numpy(np.flatnonzero(row_set == i))
            out[rows] = logits[rows]
        return out, data

    def _pass(self, split: str, data: MaskedSplit, kept: tuple[bool, ...]) -> torch.Tensor:
        """Logits of every row of ``split`` with the modalities ``kept`` kept (and the rest dropped), once."""
        if (split, kept) not in self._passes:
            keep = torch.tensor(kept).expand(data.keep.shape[0], -1).contiguous()
            forced = MaskedSplit(data.data, keep, data.placeholder, data.modalities, release=data.release)
            self._passes[split, kept] = predict(self.head, forced, self.cfg)
            self.passes += 1
        return self._passes[split, kept]
