"""Missing-modality patterns: typed configs and seeded presence masks (pure numpy, no I/O)."""
from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class MissingPattern(BaseModel):
    """One missing-modality scenario applied to a split.

    kinds:
      complete      nothing missing
      per_modality  modality m missing in exactly rates[m] of rows; by default its rows are drawn among rows
                    that keep another modality (no row loses all; rates summing past M-1 are capped);
                    ``allow_all_missing`` draws each modality independently instead
      map           missing-aware-prompts protocol: ``mp_type`` (a modality, or "both"/"all") missing at rate eta;
                    "both" splits eta equally over modalities, disjointly, so no sample loses all
      simultaneous  a fraction ``rate`` of rows lose every modality in ``modalities`` (all by default) at once
      absent        ``modality`` missing in every row (a whole modality missing at test time)
      noise         nothing missing; Gaussian noise of std ``sigma`` added to features of ``modalities`` (all)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["complete", "per_modality", "map", "simultaneous", "absent", "noise"] = "complete"
    rates: dict[str, float] = Field(default_factory=dict)
    allow_all_missing: bool = False
    eta: float = 0.0
    mp_type: str = "both"
    rate: float = 0.0
    modality: str | None = None
    modalities: list[str] | None = None
    sigma: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> "MissingPattern":
        for name, r in {**self.rates, "eta": self.eta, "rate": self.rate}.items():
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"missing rate {name}={r} must lie in [0, 1]")
        if self.kind == "absent" and not self.modality:
            raise ValueError("pattern kind 'absent' needs `modality`")
        if self.kind == "noise" and self.sigma <= 0:
            raise ValueError("pattern kind 'noise' needs sigma > 0")
        return self

    @property
    def key(self) -> str:
        """Stable, readable identifier, used in mask-table keys and metric names."""
        if self.kind == "complete":
            return "complete"
        if self.kind == "per_modality":
            body = ",".join(f"{m}={round(r * 100)}" for m, r in sorted(self.rates.items()))
            return f"per_modality[{body}]" + ("+allmiss" if self.allow_all_missing else "")
        if self.kind == "map":
            return f"map[{self.mp_type}={round(self.eta * 100)}]"
        if self.kind == "simultaneous":
            return f"simultaneous[{'+'.join(self.modalities or ['all'])}={round(self.rate * 100)}]"
        if self.kind == "absent":
            return f"absent[{self.modality}]"
        return f"noise[{'+'.join(self.modalities or ['all'])}={self.sigma:g}]"

    def check_modalities(self, modalities: list[str]) -> None:
        named = set(self.rates) | set(self.modalities or []) | ({self.modality} if self.modality else set())
        if self.kind == "map" and self.mp_type not in ("both", "all"):
            named.add(self.mp_type)
        unknown = named - set(modalities)
        if unknown:
            raise ValueError(f"pattern {self.key} names unknown modalities {sorted(unknown)}; have {modalities}")


def _rng(pattern: MissingPattern, split: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{pattern.key}|{split}|{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _exact_subset(rng: np.random.Generator, pool: np.ndarray, rate: float, n: int) -> np.ndarray:
    k = int(round(rate * n))
    return rng.choice(pool, size=min(k, len(pool)), replace=False)


def presence_mask(pattern: MissingPattern, modalities: list[str], n: int, split: str, seed: int) -> np.ndarray:
    """Boolean [n, M] presence matrix (True = present), a pure function of (pattern, split, seed, n)."""
    pattern.check_modalities(modalities)
    rng = _rng(pattern, split, seed)
    present = np.ones((n, len(modalities)), dtype=bool)
    col = {m: i for i, m in enumerate(modalities)}
    if pattern.kind == "per_modality":
        for m in modalities:
            # without allow_all_missing, draw only among rows that keep another modality: rates stay exact
            pool = np.arange(n) if pattern.allow_all_missing else np.flatnonzero(present.sum(1) >= 2)
            present[_exact_subset(rng, pool, pattern.rates.get(m, 0.0), n), col[m]] = False
    elif pattern.kind == "map":
        targets = modalities if pattern.mp_type in ("both", "all") else [pattern.mp_type]
        chosen = rng.permutation(n)[: int(round(pattern.eta * n))]
        for part, m in zip(np.array_split(chosen, len(targets)), targets):
            present[part, col[m]] = False
    elif pattern.kind == "simultaneous":
        rows = _exact_subset(rng, np.arange(n), pattern.rate, n)
        for m in pattern.modalities or modalities:
            present[rows, col[m]] = False
    elif pattern.kind == "absent":
        present[:, col[pattern.modality]] = False
    return present


def noise_generator(pattern: MissingPattern, split: str, seed: int) -> np.random.Generator | None:
    """Seeded generator for feature noise, or None when the pattern adds none."""
    return _rng(pattern, split + "/noise", seed) if pattern.kind == "noise" else None


def robustness_grid(modalities: list[str], rates: list[float]) -> list[MissingPattern]:
    """The standard robustness grid: each modality missing at each rate, the others complete."""
    grid = [MissingPattern(kind="complete")]
    for m in modalities:
        grid += [MissingPattern(kind="per_modality", rates={m: r}) for r in rates if r > 0]
    return grid


def scenario_slug(pattern: MissingPattern, modalities: list[str]) -> str:
    """Metric-name-safe scenario id that sorts well in MLflow: missing % per modality, zero-padded."""
    if pattern.kind in ("complete", "per_modality", "absent"):
        rates = {pattern.modality: 1.0} if pattern.kind == "absent" else pattern.rates
        return "/".join(f"{m}-{round(rates.get(m, 0.0) * 100):03d}" for m in modalities)
    if pattern.kind == "map":
        return f"map-{pattern.mp_type}-{round(pattern.eta * 100):03d}"
    if pattern.kind == "simultaneous":
        return f"simultaneous-{'+'.join(pattern.modalities or ['all'])}-{round(pattern.rate * 100):03d}"
    return f"noise-{'+'.join(pattern.modalities or ['all'])}-{pattern.sigma:g}"
