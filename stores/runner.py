"""Train one head under one training pattern and evaluate it on the grid of test patterns."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.config import ExperimentConfig
from models.features import add_noise, apply_presence, take
from models.heads import FeatureBatch, Head, build_head
from models.metrics import classification_metrics, primary_metric, robustness_auc
from models.patterns import MissingPattern, noise_generator, robustness_grid, scenario_slug
from models.training import FitResult, fit, predict
from .encoders import build_encoder
from .feature_store import FeatureStore, SplitFeatures, StoreError, open_store
from .masks import MaskStore


@dataclass
class Scenario:
    pattern: MissingPattern
    slug: str
    metrics: dict


@dataclass
class RunResult:
    config: ExperimentConfig
    store: dict
    fit: FitResult
    scenarios: list[Scenario]
    summary: dict
    head: Head
    variant: str
    seconds: float
    mask_tables: dict = field(default_factory=dict)

    def row(self) -> dict:
        """The run as the one table builder (stores/reporting.aggregate) reads it: variant, train pattern, seed,
        summary, scalar metrics per scenario slug, seconds."""
        return {"head": self.config.head.name, "variant": self.variant, "seed": self.config.seed,
                "train_pattern": self.config.train_pattern.key, "summary": self.summary,
                "scenarios": scenario_scalars(self.scenarios), "seconds": self.seconds}

    def scalar_metrics(self) -> dict[str, float]:
        """Flat metric dict with names that sort well in the MLflow UI."""
        out = {f"summary/{k}": float(v) for k, v in self.summary.items()}
        for s in self.scenarios:
            for k, v in s.metrics.items():
                if isinstance(v, (int, float)):
                    out[f"test/{k}/{s.slug}"] = float(v)
        out["fit/best_epoch"] = float(self.fit.best_epoch)
        out["fit/seconds"] = float(self.fit.seconds)
        return out


def scenario_scalars(scenarios: list[Scenario]) -> dict[str, dict[str, float]]:
    """{slug: {metric: value}} of the scalar metrics (per-class lists and confusion matrices left out)."""
    return {s.slug: {k: v for k, v in s.metrics.items() if isinstance(v, float)} for s in scenarios}


def load_backbones(cfg: ExperimentConfig, meta: dict) -> dict[str, torch.nn.Module]:
    """Encoder transformer blocks for heads that run them (CMPT, the LoRA oracle), for modalities whose store has
    embedding-layer tokens (Hugging Face encoders); ``cfg.head.encoder_blocks`` says whether the head runs them."""
    if cfg.head.encoder_blocks == "none":
        return {}
    enc, only = cfg.encoder_configs(), getattr(cfg.head, "modality", None)  # a unimodal head loads its own
    blocks = {}
    for m in meta.get("emb_dim", {}):
        if only not in (None, m):
            continue
        try:
            b = build_encoder(m, enc[m]).blocks()
        except ValueError as e:  # a family without a verified replay: auto falls back, "encoder" says why
            if cfg.head.encoder_blocks == "required":
                raise StoreError(f"head.backbone={cfg.head.backbone!r} for {m}: {e}") from None
            continue
        if b is not None:
            blocks[m] = b
    return blocks


def prepare(split: SplitFeatures, name: str, pattern: MissingPattern, seed: int, masks: MaskStore,
            placeholder: FeatureBatch, modalities: list[str]) -> tuple[FeatureBatch, np.ndarray]:
    """The split as seen under ``pattern``: saved presence mask applied, placeholders in, noise added."""
    present = masks.get(name, split.ids, pattern, seed)
    batch = apply_presence(split.batch, torch.from_numpy(present), placeholder, modalities)
    rng = noise_generator(pattern, name, seed)
    if rng is not None:
        batch = add_noise(batch, pattern.sigma, rng, pattern.modalities or modalities, pattern.sigma_scale)
    return batch, present


def evaluation_patterns(cfg: ExperimentConfig, modalities: list[str]) -> list[MissingPattern]:
    return robustness_grid(modalities, cfg.eval.test_rates) + list(cfg.eval.extra_patterns)


def validation_scenarios(cfg: ExperimentConfig, split: SplitFeatures, masks: MaskStore, placeholder: FeatureBatch,
                         modalities: list[str]) -> dict[str, FeatureBatch]:
    """The validation split under the training pattern, plus each modality absent when select_on='robust'."""
    patterns = [cfg.train_pattern]
    if cfg.eval.select_on == "robust":
        patterns += [MissingPattern(kind="absent", modality=m) for m in modalities]
    return {scenario_slug(p, modalities): prepare(split, "val", p, cfg.seed, masks, placeholder, modalities)[0]
            for p in patterns}


def check_store(cfg: ExperimentConfig, store: FeatureStore) -> None:
    """Fail clearly when the config's head or patterns do not fit the store."""
    for p in [cfg.train_pattern, *cfg.eval.extra_patterns]:
        p.check_modalities(store.modalities)


def evaluate_grid(cfg: ExperimentConfig, head: Head, store: FeatureStore) -> list[Scenario]:
    """Test-split metrics of ``head`` under every evaluation pattern (saved masks, seed = cfg.seed)."""
    inputs, mods, masks = tuple(head.inputs), store.modalities, MaskStore(store)
    placeholder, split = store.placeholders(inputs), store.read_split("test", inputs)
    scenarios = []
    for pattern in evaluation_patterns(cfg, mods):
        test, _ = prepare(split, "test", pattern, cfg.seed, masks, placeholder, mods)
        metrics = classification_metrics(predict(head, test, cfg.train), test.y, head.spec.task)
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


def used_rows(data: FeatureBatch, head: Head, modalities: list[str]) -> FeatureBatch:
    """Rows where one of the modalities the head is limited to (``modalities_used``, e.g. the unimodal oracle's)
    is present; every row for heads that use all modalities."""
    used = getattr(head, "modalities_used", None)
    if not used:
        return data
    cols = [modalities.index(m) for m in used]
    return take(data, torch.from_numpy(np.flatnonzero(data.present[:, cols].any(1).numpy())))


def fit_head(cfg: ExperimentConfig, store: FeatureStore, on_epoch=None) -> tuple[Head, FitResult]:
    """Build ``cfg.head`` and fit it on train (under ``cfg.train_pattern``), selecting epochs on val. Reads the
    train and val splits only, never test (tuning relies on it)."""
    check_store(cfg, store)
    backbones = load_backbones(cfg, store.meta)
    spec = store.spec()
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, spec, backbones)
    inputs, mods, masks = tuple(head.inputs), spec.modalities, MaskStore(store)
    placeholder = store.placeholders(inputs)
    splits = {s: store.read_split(s, inputs) for s in ("train", "val")}
    if not splits["train"].ids or not splits["val"].ids:
        raise StoreError(f"store {store.name} has no train or val rows; extraction incomplete?")
    train, _ = prepare(splits["train"], "train", cfg.train_pattern, cfg.seed, masks, placeholder, mods)
    result = fit(head, used_rows(train, head, mods), validation_scenarios(cfg, splits["val"], masks, placeholder, mods),
                 cfg.train, cfg.seed, on_epoch)
    return head, result


def train_and_evaluate(cfg: ExperimentConfig, store: FeatureStore | None = None, on_epoch=None) -> RunResult:
    """Fit ``cfg.head`` on train (under ``cfg.train_pattern``), select on val, evaluate the test grid."""
    t0 = time.perf_counter()
    store = (store or open_store(cfg)).pin()  # one set of Lance versions for the whole run, logged with it
    head, result = fit_head(cfg, store, on_epoch)
    spec, masks = store.spec(), MaskStore(store)
    scenarios = evaluate_grid(cfg, head, store)
    summary = summarize(scenarios, spec.task, spec.modalities, cfg.eval.test_rates)
    summary[f"val_{primary_metric(spec.task)}"] = result.best_score
    variant = cfg.head.name + (f"[{','.join(f'{m}:{v}' for m, v in head.variant.items())}]"
                               if hasattr(head, "variant") else "")
    return RunResult(cfg, store.info(), result, scenarios, summary, head.cpu(), variant, time.perf_counter() - t0,
                     mask_tables={f"seed{cfg.seed}": masks.table(seed=cfg.seed)})
