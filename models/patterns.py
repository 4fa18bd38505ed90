"""Missing-modality patterns: typed configs and seeded presence masks (pure numpy, no I/O)."""
from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class MissingPattern(BaseModel):
    """One missing-modality scenario applied to a split.

    kinds:
      complete      nothing missing
      per_modality  modality m missing in exactly round(rates[m] * n) rows. By default no row loses every
                    modality, so the rates must sum to at most M-1 (else ValueError in ``check_modalities``);
                    rows are drawn at random under that constraint (``_no_empty_rows``).
                    ``allow_all_missing`` draws each modality independently instead
      map           missing-aware-prompts protocol: ``mp_type`` (a modality, or "both"/"all") missing at rate eta;
                    "both" splits eta equally over modalities, disjointly, so no sample loses all
      simultaneous  a fraction ``rate`` of rows lose every modality in ``modalities`` (all by default) at once
      absent        ``modality`` missing in every row (a whole modality missing at test time)
      noise         nothing missing; Gaussian noise N(0, sigma) added to features of ``modalities`` (all);
                    ``sigma_scale``: "absolute" (004 Table IX, the default) or "feature_std" (sigma times each
                    feature tensor's std, this project's extension)

    Missing not at random (this project's extension; MuteBench: dropout protects only up to its training rate):
      by_class      ``modality`` missing in exactly round(r_c * n_c) of the n_c rows of each class c, with r_c
                    from ``class_rates`` (class name -> rate) and ``rate`` for classes not listed: the chance that
                    a modality is missing depends on the label (single-label data)
      burst         ``modality`` missing in exactly round(rate * n) rows that come in runs of ``burst_len``
                    consecutive rows in id order (the last run may be shorter; runs may touch): outages, a
                    sensor down for a stretch of recordings
      by_column     ``modality`` missing in exactly round(r_v * n_v) of the n_v rows whose manifest column
                    ``column`` (kept in the store by ``data.attributes``) holds v, with r_v from ``column_rates``
                    (value -> rate) and ``rate`` for other values and rows without one: missingness that
                    depends on where or how an item was collected (a site, a device, a season)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["complete", "per_modality", "map", "simultaneous", "absent", "noise", "by_class", "burst",
                  "by_column"] = "complete"
    rates: dict[str, float] = Field(default_factory=dict)
    allow_all_missing: bool = False
    eta: float = 0.0
    mp_type: str = "both"
    rate: float = 0.0
    modality: str | None = None
    modalities: list[str] | None = None
    sigma: float = 0.0
    sigma_scale: Literal["absolute", "feature_std"] = "absolute"
    class_rates: dict[str, float] = Field(default_factory=dict)  # by_class: class name -> missing rate
    burst_len: int = Field(1, ge=1)  # burst: consecutive rows per run
    column: str | None = None  # by_column: the manifest column (one of data.attributes)
    column_rates: dict[str, float] = Field(default_factory=dict)  # by_column: column value -> missing rate

    @model_validator(mode="after")
    def _check(self) -> "MissingPattern":
        for name, r in {**self.rates, **self.class_rates, **self.column_rates, "eta": self.eta,
                        "rate": self.rate}.items():
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"missing rate {name}={r} must lie in [0, 1]")
        if self.kind in ("absent", "by_class", "burst", "by_column") and not self.modality:
            raise ValueError(f"pattern kind {self.kind!r} needs `modality`")
        if self.kind == "by_column" and not self.column:
            raise ValueError("pattern kind 'by_column' needs `column` (a manifest column kept by data.attributes)")
        if self.kind == "noise" and self.sigma <= 0:
            raise ValueError("pattern kind 'noise' needs sigma > 0")
        return self

    @property
    def key(self) -> str:
        """Stable, readable, exact identifier (mask-table keys, run names): rates in percent, written exactly
        (30 for 0.3, 33.3 for 0.333, 33.4 for 0.334), so distinct patterns never share a key."""
        if self.kind == "complete":
            return "complete"
        if self.kind == "per_modality":
            body = ",".join(f"{m}={_pct(r)}" for m, r in sorted(self.rates.items()))
            return f"per_modality[{body}]" + ("+allmiss" if self.allow_all_missing else "")
        if self.kind == "map":
            return f"map[{self.mp_type}={_pct(self.eta)}]"
        if self.kind == "simultaneous":
            return f"simultaneous[{'+'.join(self.modalities or ['all'])}={_pct(self.rate)}]"
        if self.kind == "absent":
            return f"absent[{self.modality}]"
        if self.kind == "by_class":
            body = ",".join(f"{c}={_pct(r)}" for c, r in sorted(self.class_rates.items()))
            return f"by_class[{self.modality}|{body},else={_pct(self.rate)}]"
        if self.kind == "burst":
            return f"burst[{self.modality}={_pct(self.rate)},len={self.burst_len}]"
        if self.kind == "by_column":
            body = ",".join(f"{v}={_pct(r)}" for v, r in sorted(self.column_rates.items()))
            return f"by_column[{self.modality}|{self.column}:{body},else={_pct(self.rate)}]"
        return f"noise[{'+'.join(self.modalities or ['all'])}={_num(self.sigma)},{self.sigma_scale}]"

    def check_modalities(self, modalities: list[str]) -> None:
        named = set(self.rates) | set(self.modalities or []) | ({self.modality} if self.modality else set())
        if self.kind == "map" and self.mp_type not in ("both", "all"):
            named.add(self.mp_type)
        unknown = named - set(modalities)
        if unknown:
            raise ValueError(f"pattern {self.key} names unknown modalities {sorted(unknown)}; have {modalities}")
        total = sum(self.rates.values())
        if self.kind == "per_modality" and not self.allow_all_missing and total > len(modalities) - 1 + 1e-9:
            raise ValueError(f"pattern {self.key} is impossible: rates sum to {_num(total)} but a row keeping one of "
                             f"{len(modalities)} modalities loses at most {len(modalities) - 1} "
                             "(lower the rates or set allow_all_missing)")


def _num(x: float) -> str:
    """Shortest exact text of a float (Python's repr), without a trailing '.0'."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _pct(rate: float) -> str:
    """``rate`` in percent, exact: the decimal of its shortest repr times 100 ('30', '33.3', '7')."""
    return f"{(Decimal(repr(float(rate))) * 100).normalize():f}"


def _pct_slug(rate: float) -> str:
    """``_pct`` with the whole part zero-padded to 3 digits, so slugs sort ('030', '033.3', '100')."""
    whole, dot, frac = _pct(rate).partition(".")
    return whole.zfill(3) + dot + frac


def _rng(pattern: MissingPattern, split: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{pattern.key}|{split}|{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _exact_subset(rng: np.random.Generator, pool: np.ndarray, rate: float, n: int) -> np.ndarray:
    k = int(round(rate * n))
    return rng.choice(pool, size=min(k, len(pool)), replace=False)


def _missing_counts(rates: list[float], n: int, cap: int) -> list[int]:
    """round(rate * n) rows per modality; where rounding alone pushes the total past ``cap`` (rates summing to
    exactly M-1 with odd n), the counts rounded up the most give one row back."""
    counts = [int(round(r * n)) for r in rates]
    for j in sorted(range(len(rates)), key=lambda j: rates[j] * n - counts[j])[: max(0, sum(counts) - cap)]:
        counts[j] -= 1
    if sum(counts) > cap:
        raise ValueError(f"{sum(counts)} missing cells cannot fit in {n} rows that each keep a modality")
    return counts


def _no_empty_rows(rng: np.random.Generator, counts: list[int], n: int) -> np.ndarray:
    """Boolean [n, M] missing matrix with exactly ``counts[m]`` missing rows per column and no row missing
    every column (requires sum(counts) <= n(M-1)). Columns are drawn one by one, uniformly at random, then
    repaired: by Gale-Ryser, the remaining columns (q of them, D missing cells) still fit iff the rows that
    have lost every column drawn so far number at most n*q - D, so excess picks among those rows are swapped
    for random other rows. Exact for every feasible combination (an unconstrained greedy draw is not)."""
    M = len(counts)
    missing = np.zeros((n, M), dtype=bool)
    lost_all = np.ones(n, dtype=bool)  # rows missing every column drawn so far (all rows, before the first)
    for m, k in enumerate(counts):
        limit = n * (M - 1 - m) - sum(counts[m + 1:])
        pick = rng.choice(n, size=k, replace=False)
        in_lost = pick[lost_all[pick]]
        if len(in_lost) > limit:
            others = rng.permutation(np.setdiff1d(np.flatnonzero(~lost_all), pick))
            excess = len(in_lost) - limit
            pick = np.concatenate([np.setdiff1d(pick, in_lost[:excess]), others[:excess]])
        missing[pick, m] = True
        lost_all &= missing[:, m]
    return missing


def _by_group(rng: np.random.Generator, pattern: MissingPattern, groups: Sequence[str | None] | None
              ) -> np.ndarray:
    """Rows missing under a ``by_class`` / ``by_column`` pattern: in each group of rows (a class, a column
    value; rows without a value form one group), exactly its rate of its rows, drawn at random."""
    if groups is None:
        what = "labels" if pattern.kind == "by_class" else f"values of column {pattern.column!r}"
        raise ValueError(f"pattern {pattern.key} depends on the rows' {what}: its mask needs them")
    rates = pattern.class_rates if pattern.kind == "by_class" else pattern.column_rates
    groups = np.asarray(groups, dtype=object)
    rows = [_exact_subset(rng, np.flatnonzero(groups == g), rates.get(g, pattern.rate), int((groups == g).sum()))
            for g in sorted(set(groups.tolist()), key=str)]
    return np.concatenate(rows) if rows else np.zeros(0, dtype=int)


def _bursts(rng: np.random.Generator, rate: float, run: int, n: int) -> np.ndarray:
    """Exactly round(rate * n) rows in runs of ``run`` consecutive rows (the last one shorter), placed at random:
    the runs and the remaining rows are shuffled as blocks (stars and bars), so every arrangement can occur."""
    k = int(round(rate * n))
    lengths = [run] * (k // run) + ([k % run] if k % run else [])
    blocks = np.array([1] * len(lengths) + [0] * (n - k))  # 1: a run, 0: one present row
    rng.shuffle(blocks)
    sizes = np.where(blocks == 1, 0, 1)
    sizes[blocks == 1] = lengths
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.concatenate([np.arange(s, s + z) for s, z, b in zip(starts, sizes, blocks) if b] or [np.zeros(0, int)])


def presence_mask(pattern: MissingPattern, modalities: list[str], n: int, split: str, seed: int,
                  groups: Sequence[str | None] | None = None) -> np.ndarray:
    """Boolean [n, M] presence matrix (True = present), a pure function of (pattern, split, seed, n) and, for a
    ``by_class`` pattern, the rows' class names, for a ``by_column`` one their column values (``groups``)."""
    pattern.check_modalities(modalities)
    rng = _rng(pattern, split, seed)
    present = np.ones((n, len(modalities)), dtype=bool)
    col = {m: i for i, m in enumerate(modalities)}
    if pattern.kind == "per_modality" and pattern.allow_all_missing:
        for m in modalities:
            present[_exact_subset(rng, np.arange(n), pattern.rates.get(m, 0.0), n), col[m]] = False
    elif pattern.kind == "per_modality":
        counts = _missing_counts([pattern.rates.get(m, 0.0) for m in modalities], n, n * (len(modalities) - 1))
        present = ~_no_empty_rows(rng, counts, n)
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
    elif pattern.kind in ("by_class", "by_column"):
        present[_by_group(rng, pattern, groups), col[pattern.modality]] = False
    elif pattern.kind == "burst":
        present[_bursts(rng, pattern.rate, pattern.burst_len, n), col[pattern.modality]] = False
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


def missing_scenario(m: str, modalities: list[str]) -> str:
    """The robustness-grid slug of ``m`` 100% missing, the others complete."""
    return scenario_slug(MissingPattern(kind="absent", modality=m), modalities)


def modalities_of(scenarios: list[str]) -> list[str]:
    """The modalities, in order, named by robustness-grid slugs such as ``image-000/text-100``."""
    for s in scenarios:
        parts = [p.rsplit("-", 1) for p in s.split("/")]
        if all(len(p) == 2 and p[1].isdigit() for p in parts):
            return [p[0] for p in parts]
    return []


def scenario_slug(pattern: MissingPattern, modalities: list[str]) -> str:
    """Metric-name-safe scenario id that sorts well in MLflow: missing % per modality, zero-padded."""
    if pattern.kind in ("complete", "per_modality", "absent"):
        rates = {pattern.modality: 1.0} if pattern.kind == "absent" else pattern.rates
        body = "/".join(f"{m}-{_pct_slug(rates.get(m, 0.0))}" for m in modalities)
        return body + ("-allmiss" if pattern.allow_all_missing else "")
    if pattern.kind == "map":
        return f"map-{pattern.mp_type}-{_pct_slug(pattern.eta)}"
    if pattern.kind == "simultaneous":
        return f"simultaneous-{'+'.join(pattern.modalities or ['all'])}-{_pct_slug(pattern.rate)}"
    if pattern.kind == "by_class":  # (class names are data: a short digest keeps the slug metric-safe)
        digest = hashlib.sha256(pattern.key.encode()).hexdigest()[:6]
        return f"by_class-{pattern.modality}-{_pct_slug(pattern.rate)}-{digest}"
    if pattern.kind == "burst":
        return f"burst-{pattern.modality}-{_pct_slug(pattern.rate)}-len{pattern.burst_len}"
    if pattern.kind == "by_column":  # (column names and values are data: a digest, as for by_class)
        digest = hashlib.sha256(pattern.key.encode()).hexdigest()[:6]
        return f"by_column-{pattern.modality}-{_pct_slug(pattern.rate)}-{digest}"
    scale = {"absolute": "abs", "feature_std": "std"}[pattern.sigma_scale]
    return f"noise-{'+'.join(pattern.modalities or ['all'])}-{_num(pattern.sigma)}-{scale}"
