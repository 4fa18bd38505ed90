"""SRMM (paper 004): one shared, modality-invariant branch fed each modality's pooled embedding in turn."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import FeatureBatch, Head, HeadConfig, HeadOutput, ModalitySpec, register_head, usable

Strategy = Literal["S-1", "S-2", "S-3", "all_present_rows"]


class SRMMConfig(HeadConfig):
    """Modality switching strategies (004 §V-C), i.e. which modality's embedding trains the branch when:

    S-1  (paper default, used for all its results) every batch is multimodal: each sample contributes one
         randomly chosen present modality.
    S-2  each batch is, with probability 1/2 (so 50% of an epoch's batches in expectation, in random order),
         unimodal as in S-3; otherwise multimodal as in S-1.
    S-3  every batch is unimodal: one modality drawn at random per batch.
    all_present_rows  NOT a paper strategy (this project's extension): every present modality of every sample
         is a separate example in every batch.

    A unimodal batch draws its modality among those present in at least two rows of the batch (one if none is;
    BatchNorm needs two rows); rows lacking it are
    skipped from that step's loss (``HeadOutput.target_index`` lists the rows used), never fed a placeholder.

    Branch sizes follow §IV-B's FC layers {input_dim, layer_dim, layer_dim, n_classes}: ``hidden`` is layer_dim
    and ``emb_dim`` defaults to it. ``embed_scale`` is a DEVIATION from the paper (which has none, i.e. 1.0)."""

    name: Literal["srmm"] = "srmm"
    strategy: Strategy = "S-1"
    proj_dim: int = Field(512, ge=1)
    hidden: int = Field(512, ge=1)
    emb_dim: int | None = Field(None, ge=1)  # None: = hidden, as in the paper
    dropout: float = Field(0.5, ge=0, lt=1)  # §IV-B: dropout of 50%
    # DEVIATION (cosine-classifier scale on the L2-normalised embedding, not in 004): at 1.0 the bounded logits
    # underfit: fashion complete accuracy 95.8% vs 97.9% at 16
    embed_scale: float = Field(16.0, gt=0)


@register_head(SRMMConfig)
class SRMM(Head):
    """The single branch of 004 §III-B: FC-BN-ReLU-Dropout -> FC-L2norm -> FC (softmax in the CE loss, Eq. 3).
    At test time logits are averaged over present modalities (late fusion, §III-B).

    Deviations (named in ``variant``): encoders whose pooled sizes differ get a per-modality linear projection to
    ``proj_dim`` first ("per_modality_proj"; the paper picks encoders with equal sizes), and ``embed_scale``."""

    def __init__(self, cfg: SRMMConfig, spec: ModalitySpec):
        super().__init__(cfg, spec)
        dims = {spec.vec_dim[m] for m in spec.modalities}
        d = dims.pop() if len(dims) == 1 else cfg.proj_dim
        self.proj = nn.ModuleDict({m: (nn.Identity() if spec.vec_dim[m] == d else nn.Linear(spec.vec_dim[m], d))
                                   for m in spec.modalities})
        emb_dim = cfg.emb_dim or cfg.hidden
        self.fc1 = nn.Sequential(nn.Linear(d, cfg.hidden), nn.BatchNorm1d(cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.fc2 = nn.Linear(cfg.hidden, emb_dim)
        self.cls = nn.Linear(emb_dim, spec.n_classes)
        deviations = ([f"embed_scale={cfg.embed_scale:g}"] if cfg.embed_scale != 1.0 else []) + \
            (["per_modality_proj"] if len({spec.vec_dim[m] for m in spec.modalities}) > 1 else [])
        self.variant = {"switch": cfg.strategy + ("(non-paper)" if cfg.strategy == "all_present_rows" else "")}
        if deviations:
            self.variant["deviation"] = "+".join(deviations)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.cfg.embed_scale * F.normalize(self.fc2(self.fc1(x)), dim=-1))

    def all_logits(self, batch: FeatureBatch) -> torch.Tensor:
        """[M, B, C] logits of every modality through the shared branch, one batched call."""
        x = torch.stack([self.proj[m](batch.vec[m]) for m in self.spec.modalities])
        M, B, D = x.shape
        return self.branch(x.reshape(M * B, D)).reshape(M, B, -1)

    def switch(self, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, modality columns) that train the branch this step, per ``cfg.strategy`` (004 §V-C)."""
        strategy = self.cfg.strategy
        if strategy == "all_present_rows":
            return present.nonzero(as_tuple=True)
        unimodal = strategy == "S-3" or (strategy == "S-2" and bool(torch.rand(()) < 0.5))
        if unimodal:
            counts = present.sum(0)  # prefer modalities in >= 2 rows: BatchNorm needs 2 rows in training
            candidates = (counts >= counts.max().clamp(max=2)).nonzero().flatten()
            m = candidates[torch.randint(len(candidates), ())]
            rows = present[:, m].nonzero().flatten()
            return rows, torch.full_like(rows, int(m))
        cols = (torch.rand(present.shape, device=present.device) * present).argmax(1)  # S-1
        return torch.arange(present.shape[0], device=present.device), cols

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        present = usable(batch.present)  # [B, M]
        if not self.training:
            w = present.T.unsqueeze(-1).float()  # [M, B, 1]
            logits = (self.all_logits(batch) * w).sum(0) / w.sum(0)
            return HeadOutput(logits, self.zero(logits))
        rows, cols = self.switch(present)
        x = torch.stack([self.proj[m](batch.vec[m]) for m in self.spec.modalities], 1)[rows, cols]
        logits = self.branch(x)
        return HeadOutput(logits, self.zero(logits), target_index=rows)
