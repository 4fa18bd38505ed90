"""SRMM (paper 004): one shared, modality-invariant branch fed each modality's pooled embedding in turn."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..head_configs import SRMMConfig
from .base import FeatureBatch, Head, HeadOutput, ModalitySpec, present_mean, register_head, usable

@register_head(SRMMConfig)
class SRMM(Head):
    """The single branch of 004 §III-B: FC-BN-ReLU-Dropout -> FC-L2norm -> FC (softmax in the CE loss, Eq. 3).
    At test time the softmax outputs of the present modalities are averaged (late fusion, §III-B) and their log
    returned as the logits, so that cross-entropy and argmax read them as any head's (``fusion="prob"``);
    ``fusion="logit"`` (a variant) averages the logits instead.

    Deviation by construction (named in ``variant``): encoders whose pooled sizes differ get a per-modality linear
    projection to ``proj_dim`` first ("per_modality_proj"; the paper picks encoders with equal sizes). Config
    values that differ from the paper's (``embed_scale``, ``hidden``, ...) are named by ``models.paper``."""

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
        self.variant = {"switch": cfg.strategy + ("(non-paper)" if cfg.strategy == "all_present_rows" else "")}
        if len({spec.vec_dim[m] for m in spec.modalities}) > 1:
            self.variant["deviation"] = "per_modality_proj"

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.cfg.embed_scale * F.normalize(self.fc2(self.fc1(x)), dim=-1))

    def all_logits(self, batch: FeatureBatch) -> torch.Tensor:
        """[M, B, C] logits of every modality through the shared branch, one batched call."""
        x = torch.stack([self.proj[m](batch.vec[m]) for m in self.spec.modalities])
        M, B, D = x.shape
        return self.branch(x.reshape(M * B, D)).reshape(M, B, -1)

    def fuse(self, logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """[B, C] from every modality's logits [M, B, C]: the log of the mean softmax output over the present
        modalities (sigmoid outputs and their logit for multi-label tasks), or the mean logit (``fusion="logit"``)."""
        if self.cfg.fusion == "logit":
            return present_mean(logits, present)
        if self.spec.task == "multilabel":
            return torch.logit(present_mean(torch.sigmoid(logits), present), eps=1e-7)
        return present_mean(torch.softmax(logits, -1), present).clamp_min(1e-30).log()

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
            logits = self.fuse(self.all_logits(batch).float(), present)
            return HeadOutput(logits, self.zero(logits))
        rows, cols = self.switch(present)
        x = torch.stack([self.proj[m](batch.vec[m]) for m in self.spec.modalities], 1)[rows, cols]
        logits = self.branch(x)
        return HeadOutput(logits, self.zero(logits), target_index=rows)
