"""Gap closed by a robust head when a modality is missing: how far it gets from zero-fill early fusion towards
the unimodal oracle of the modalities that remain (pure computation, no I/O).

    gap_closed_<m> = (head - early) / (oracle_of_remaining - early),  all at 100% ``m`` missing at test

0 = no better than zero-fill early fusion, 1 = as good as a model trained and tested on the remaining modality.
"""
from __future__ import annotations

import numpy as np

from models.patterns import MissingPattern, missing_scenario, modalities_of, scenario_slug
from models.records import COMPARE, RunRow

EARLY = "early"  # zero-fill early fusion's variant name
MODDROP = "moddrop"  # modality dropout's
# below one point (6-10 test rows here) the ratio is noise: Fashion's 0.2-point gap gave +-300% on one seed
MIN_GAP = 0.01


def gap_closed(head: float, early: float, oracle: float, min_gap: float = MIN_GAP) -> float | None:
    """None when the oracle beats zero-fill early by less than ``min_gap`` (nothing measurable to close)."""
    denom = oracle - early
    return None if denom < min_gap else (head - early) / denom


def oracle_variant(modality: str) -> str:
    return f"oracle[only:{modality}]"


def without_deviations(variant: str) -> str:
    """``variant`` less its ``deviation:`` part: what a reference run departs from the papers in (a paper
    protocol's ``select=robust``) does not change which reference it is."""
    name, _, rest = variant.partition("[")
    parts = [p for p in rest.rstrip("]").split(",") if p and not p.startswith("deviation:")]
    return name + (f"[{','.join(parts)}]" if parts else "")


def add_gap_closed(results: list[RunRow], metric: str, modalities: list[str]) -> list[str]:
    """Set ``summary["gap_closed_<m>"]`` on every run of ``results`` whose
    references exist among them: mean over runs of zero-fill ``early`` and of the oracle of the remaining modality
    (two-modality datasets; with more, the oracle of the remaining set is not one run). Oracle runs get none.
    Returns the keys set."""
    def mean_at(variant: str, scenario: str) -> float | None:
        vals = [r.scenarios[scenario][metric] for r in results
                if without_deviations(r.variant) == variant and metric in r.scenarios.get(scenario, {})]
        return float(np.mean(vals)) if vals else None

    keys = []
    if len(modalities) != 2:
        return keys
    for m in modalities:
        rest = next(x for x in modalities if x != m)
        s = missing_scenario(m, modalities)
        early, oracle = mean_at(EARLY, s), mean_at(oracle_variant(rest), s)
        if early is None or oracle is None:
            continue
        for r in results:  # the oracles are the references, not methods: no gap of their own
            if not r.variant.startswith("oracle[") and metric in r.scenarios.get(s, {}):
                g = gap_closed(r.scenarios[s][metric], early, oracle)
                if g is not None:
                    r.summary[f"gap_closed_{m}"] = g
                    keys.append(f"gap_closed_{m}")
    return sorted(set(keys))


def gap_metrics(results: list[RunRow], metric: str) -> dict[str, dict[str, float]]:
    """``compare/gap_closed_<m>`` of each logged run of a sweep, by run id: the metrics only the whole sweep
    gives (its parent run logs them on the children, in their comparison group)."""
    keys = add_gap_closed(results, metric, modalities_of(sorted({s for r in results for s in r.scenarios})))
    out = {r.run_id: {COMPARE + k: r.summary[k] for k in keys if k in r.summary} for r in results if r.run_id}
    return {run_id: m for run_id, m in out.items() if m}


def protection_horizon(results: list[RunRow], metric: str) -> dict[str, dict[str, float | None]]:
    """How far each head's protection reaches (this project's extension; MuteBench reports that dropout protects
    only up to its training rate): per head variant and training pattern (mean over its runs) and modality m,
    the lowest missing rate of m in the test grid at which it falls below the oracle of the remaining modality
    (``oracle_<m>``) and below modality dropout (``moddrop_<m>``) at that rate; None: not within the grid (or no
    reference run). Each reference is the one trained under the same pattern where the sweep has it (a head
    trained under a class-dependent pattern against modality dropout trained under it too), else the one
    trained complete. Two-modality datasets. Keys: the variant for a head trained complete, ``<variant> @
    <train pattern>`` for one trained under a pattern; ``{variant: {"oracle_image": 0.5, ...}}``."""
    scenarios = sorted({s for r in results for s in r.scenarios})
    modalities = modalities_of(scenarios)
    if len(modalities) != 2:
        return {}

    def mean_at(variant: str, train: str, scenario: str) -> float | None:
        vals = [r.scenarios[scenario][metric] for r in results if r.train_pattern == train
                and without_deviations(r.variant) == variant and metric in r.scenarios.get(scenario, {})]
        return float(np.mean(vals)) if vals else None

    def trained_under(variant: str, train: str) -> str:
        return train if any(without_deviations(r.variant) == variant and r.train_pattern == train
                            for r in results) else "complete"

    heads = sorted({(r.variant, r.train_pattern) for r in results if not r.variant.startswith("oracle[")})
    names = {(h, t): h if t == "complete" else f"{h} @ {t}" for h, t in heads}
    out: dict[str, dict[str, float | None]] = {name: {} for name in names.values()}
    for m in modalities:
        rest = next(x for x in modalities if x != m)
        grid = [(rate, s) for rate in np.round(np.linspace(0, 1, 101), 2)
                if (s := scenario_slug(MissingPattern(kind="per_modality", rates={m: float(rate)}), modalities))
                in scenarios]
        for h, train in heads:
            for name, ref in (("oracle", oracle_variant(rest)), ("moddrop", MODDROP)):
                ref_train = trained_under(ref, train)
                below = [rate for rate, s in grid if (mine := mean_at(without_deviations(h), train, s)) is not None
                         and (theirs := mean_at(ref, ref_train, s)) is not None and mine < theirs]
                out[names[h, train]][f"{name}_{m}"] = float(below[0]) if below else None
    return out
