"""One run without Prefect: train one head under one training pattern (selecting epochs on validation) and evaluate
it on the grid of test patterns."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from models.config import ExperimentConfig
from models.features import Split, take
from models.heads import FeatureBatch, Head, build_head
from models.calibration import fit_temperature, presence_key
from models.paper import deviations
from models.metrics import classification_metrics, expected_calibration_error, primary_metric, robustness_auc
from models.patterns import MissingPattern, robustness_grid, scenario_slug
from models.records import RunResult, Scenario
from models.training import FitResult, fit
from stores.encoders import load_backbones
from stores.features.feature_store import FeatureStore, StoreError, open_store
from stores.features.masks import MaskStore
from stores.features.scenarios import ScenarioReader
from runs.scenario_logits import ScenarioLogits

# deterministic cuBLAS kernels (train.deterministic) need this before CUDA's first call
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def evaluation_patterns(cfg: ExperimentConfig, modalities: list[str]) -> list[MissingPattern]:
    return robustness_grid(modalities, cfg.eval.test_rates) + list(cfg.eval.extra_patterns)


def validation_scenarios(cfg: ExperimentConfig, reader: ScenarioReader) -> dict[str, FeatureBatch]:
    """The validation split under the training pattern, plus each modality absent when select_on='robust'."""
    patterns = [cfg.train_pattern]
    if cfg.eval.select_on == "robust":
        patterns += [MissingPattern(kind="absent", modality=m) for m in reader.modalities]
    return {scenario_slug(p, reader.modalities): reader.under("val", p) for p in patterns}


def check_store(cfg: ExperimentConfig, store: FeatureStore) -> None:
    """Fail clearly when the config's head or patterns do not fit the store."""
    for p in [cfg.train_pattern, *cfg.eval.extra_patterns]:
        p.check_modalities(store.modalities)


def scenario_logits(cfg: ExperimentConfig, head: Head, store: FeatureStore) -> ScenarioLogits:
    """``head``'s logits under missing patterns (saved masks, seed = cfg.seed), each split scored once per set
    of kept modalities: what the evaluation grid and the calibration share."""
    return ScenarioLogits(head, ScenarioReader(store, tuple(head.inputs), cfg.seed), cfg.train)


def evaluate_grid(cfg: ExperimentConfig, head: Head, store: FeatureStore,
                  logits: ScenarioLogits | None = None) -> list[Scenario]:
    """Test-split metrics of ``head`` under every evaluation pattern (saved masks, seed = cfg.seed)."""
    logits = logits or scenario_logits(cfg, head, store)
    mods = logits.reader.modalities
    scenarios = []
    for pattern in evaluation_patterns(cfg, mods):
        out, test = logits.under("test", pattern)
        metrics = classification_metrics(out, test.y, head.spec.task)
        scenarios.append(Scenario(pattern, scenario_slug(pattern, mods), metrics))
    return scenarios


def summarize(scenarios: list[Scenario], task: str, modalities: list[str], test_rates: list[float]) -> dict[str, float]:
    """Grid mean (over the robustness grid of ``test_rates`` only, so extra patterns do not move it),
    complete-data score and the area under each modality's robustness curve."""
    key = primary_metric(task)
    grid = scenarios[: len(robustness_grid(modalities, test_rates))]  # evaluation_patterns puts the grid first
    summary = {f"grid_mean_{key}": float(np.mean([s.metrics[key] for s in grid])),
               f"complete_{key}": scenarios[0].metrics[key]}
    for m in modalities:
        curve = [(0.0, scenarios[0].metrics[key])] + [(s.pattern.rates[m], s.metrics[key]) for s in grid
                                                      if s.pattern.kind == "per_modality" and m in s.pattern.rates]
        summary[f"aurc_{m}_missing"] = robustness_auc([r for r, _ in curve], [v for _, v in curve])
    return summary


def used_index(data: Split, head: Head, modalities: list[str]) -> torch.Tensor | None:
    """Positions of the rows where one of the modalities the head is limited to (``modalities_used``, e.g. the
    unimodal oracle's) is present; None (every row) for heads that use all modalities."""
    used = getattr(head, "modalities_used", None)
    if not used:
        return None
    cols = [modalities.index(m) for m in used]
    return torch.from_numpy(np.flatnonzero(data.present[:, cols].any(1).numpy()))


def used_rows(data: Split, head: Head, modalities: list[str]) -> Split:
    """The rows of ``data`` the head can score (``used_index``)."""
    rows = used_index(data, head, modalities)
    return data if rows is None else take(data, rows)


def fit_head(cfg: ExperimentConfig, store: FeatureStore, on_epoch=None) -> tuple[Head, FitResult]:
    """Build ``cfg.head`` and fit it on train (under ``cfg.train_pattern``), selecting epochs on val. Reads the
    train and val splits only, never test (tuning relies on it)."""
    check_store(cfg, store)
    backbones = load_backbones(cfg.head, cfg.encoder_configs(), store.meta.emb_dim)
    spec = store.spec()
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, spec, backbones)
    reader = ScenarioReader(store, tuple(head.inputs), cfg.seed)
    if not reader.split("train").ids or not reader.split("val").ids:
        raise StoreError(f"store {store.name} has no train or val rows; extraction incomplete?")
    train = reader.under("train", cfg.train_pattern)
    result = fit(head, used_rows(train, head, reader.modalities), validation_scenarios(cfg, reader), cfg.train,
                 cfg.seed, on_epoch)
    return head, result


def evaluate(cfg: ExperimentConfig, head: Head, store: FeatureStore,
             logits: ScenarioLogits | None = None) -> tuple[list[Scenario], dict[str, float]]:
    """``head``'s test scenarios (``evaluate_grid``) and their summary (``summarize``)."""
    scenarios = evaluate_grid(cfg, head, store, logits)
    return scenarios, summarize(scenarios, store.meta.task, store.modalities, cfg.eval.test_rates)


def calibrate(cfg: ExperimentConfig, head: Head, store: FeatureStore,
              logits: ScenarioLogits | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """One temperature per set of present modalities (complete data, each modality absent), fitted on the
    validation split (``models.calibration``), and the ECE before and after it on validation and test
    (``ece/<split>_<before|after>/<present modalities>``). Multi-class heads only."""
    if head.spec.task != "multiclass":
        return {}, {}
    logits = logits or scenario_logits(cfg, head, store)
    mods = logits.reader.modalities
    temperatures, metrics = {}, {}
    for pattern in [MissingPattern(), *(MissingPattern(kind="absent", modality=m) for m in mods)]:
        key = presence_key([m for m in mods if pattern.kind == "complete" or m != pattern.modality])
        val_logits, val_y = used_logits(*logits.under("val", pattern), head, mods)
        if len(val_y) == 0:
            continue
        temperatures[key] = t = fit_temperature(val_logits, val_y)
        for split, (out, y) in (("val", (val_logits, val_y)),
                                ("test", used_logits(*logits.under("test", pattern), head, mods))):
            for when, scale in (("before", 1.0), ("after", t)):
                prob = torch.softmax(out / scale, -1).numpy()
                metrics[f"ece/{split}_{when}/{key}"] = expected_calibration_error(prob, y.numpy())
    return temperatures, metrics


def used_logits(logits: torch.Tensor, data: Split, head: Head, modalities: list[str]) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The logits and labels of the rows the head can score (``used_index``)."""
    rows = used_index(data, head, modalities)
    return (logits, data.y) if rows is None else (logits[rows], data.y[rows])


def train_and_evaluate(cfg: ExperimentConfig, store: FeatureStore | None = None, on_epoch=None) -> RunResult:
    """Fit ``cfg.head`` on train (under ``cfg.train_pattern``), select on val, evaluate the test grid."""
    t0 = time.perf_counter()
    store = (store or open_store(cfg)).pin()  # one set of Lance versions for the whole run, logged with it
    head, result = fit_head(cfg, store, on_epoch)
    logits = scenario_logits(cfg, head, store)  # test and val scored once per set of kept modalities
    scenarios, summary = evaluate(cfg, head, store, logits)
    summary[f"val_{primary_metric(store.meta.task)}"] = result.best_score
    temperatures, calibration = calibrate(cfg, head, store, logits)
    variant, named = run_variant(cfg, head, store.modalities)
    return RunResult(cfg, store.info(), result, scenarios, summary, head.cpu(), variant, time.perf_counter() - t0,
                     mask_tables={f"seed{cfg.seed}": MaskStore(store).table(seed=cfg.seed)},
                     temperatures=temperatures, calibration=calibration, deviations=named)


def run_variant(cfg: ExperimentConfig, head: Head, modalities: list[str]) -> tuple[str, list[str]]:
    """The run's label, ``<head>[<part>:<value>,...,deviation:<a>+<b>...]``, and its deviations: those the head
    makes by construction (``head.variant["deviation"]``) then every config value that differs from the
    paper's (``models.paper.deviations``: head, training recipe, a paper protocol's selection)."""
    parts = dict(getattr(head, "variant", {}))
    named = [d for d in parts.pop("deviation", "").split("+") if d]
    named += deviations(cfg.head, cfg.train, cfg.eval, modalities)
    if named:
        parts["deviation"] = "+".join(named)
    return cfg.head.name + (f"[{','.join(f'{k}:{v}' for k, v in parts.items())}]" if parts else ""), named
