"""Equal-budget hyper-parameter search: every head gets the same number of Optuna trials (seeded TPE, median
pruning on the per-epoch validation score), scored on the validation split only; the best parameters become
``configs/tuned/<dataset>-<head>.yaml``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from models.config import ExperimentConfig
from models.heads import parse_head_config
from models.metrics import primary_metric
from models.records import TrialRecord, TuneResult
from models.search_spaces import SEARCH_SPACE
from runs.train import fit_head
from stores.config_files import nest, with_tree, write_tuned
from stores.features.feature_store import FeatureStore

if TYPE_CHECKING:  # imported where a search runs: 0.3 s that `mm train` (flows.pipeline imports this) need not pay
    import optuna

FitFn = Callable[..., tuple[Any, Any]]  # (cfg, store, on_epoch) -> (head, FitResult); reads train + val only


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict[str, Any]:
    """One sample of a search space declared in models/search_spaces.py."""
    out = {}
    for key, d in space.items():
        if "float" in d:
            out[key] = trial.suggest_float(key, *d["float"], log=d.get("log", False))
        elif "int" in d:
            out[key] = trial.suggest_int(key, *d["int"], log=d.get("log", False))
        else:
            out[key] = trial.suggest_categorical(key, d["choice"])
    return out


def head_base(cfg: ExperimentConfig, head: str) -> ExperimentConfig:
    """The config a head's trials start from: ``head`` (keeping the config's own head settings when it is the
    same head, e.g. the oracle's modality), selection metric from ``tune.metric``."""
    h = cfg.head.model_dump(exclude_defaults=True) if cfg.head.name == head else {}
    return cfg.model_copy(update={"head": parse_head_config({**h, "name": head}),
                                  "eval": cfg.eval.model_copy(update={"select_on": cfg.tune.metric})})


def tuned_tree(base: ExperimentConfig, params: dict[str, Any]) -> dict:
    """The settings a tuned run needs: the head (name and any non-default fields), the sampled knobs and the
    epoch budget the trials ran with."""
    tree = nest({**{f"head.{k}": v for k, v in base.head.model_dump(exclude_defaults=True).items()},
                 "head.name": base.head.name, "train.epochs": base.train.epochs, **params})
    tree["head"] = {"name": tree["head"].pop("name"), **tree["head"]}
    return tree


def tuned_path(cfg: ExperimentConfig, head: str) -> Path:
    modality = getattr(cfg.head, "modality", None) if cfg.head.name == head else None
    return Path(cfg.tune.out_dir) / f"{cfg.data.dataset_name}-{head}{f'-{modality}' if modality else ''}.yaml"


def current_values(cfg: ExperimentConfig, space: dict[str, dict]) -> dict[str, Any]:
    """The config's own values of a search space's knobs (those inside the space's ranges)."""
    out = {}
    for key, d in space.items():
        section, name = key.split(".")
        v = getattr(cfg.head if section == "head" else cfg.train, name)
        lo_hi = d.get("float") or d.get("int")
        if (lo_hi and lo_hi[0] <= v <= lo_hi[1]) or (not lo_hi and v in d["choice"]):
            out[key] = v
    return out


def tune_head(cfg: ExperimentConfig, head: str, store: FeatureStore, fit_fn: FitFn = fit_head,
              on_trial: Callable[[TrialRecord], None] | None = None) -> TuneResult:
    """``cfg.tune.n_trials`` trials of ``head`` (seeded TPE over SEARCH_SPACE[head]). Each trial fits on train
    and returns its best-epoch validation score; the pruner sees the per-epoch validation scores. ``fit_fn``
    gets the trial's config, the store and the per-epoch callback, nothing from the test split."""
    import optuna

    base = head_base(cfg, head)
    key = f"val_{primary_metric(store.meta.task)}"
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2) if cfg.tune.prune
              else optuna.pruners.NopPruner())
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed),
                                pruner=pruner, study_name=f"{cfg.data.dataset_name}-{head}")
    if cfg.tune.start_from_defaults:  # trial 0 = the config's own settings: tuning never returns worse on val
        study.enqueue_trial(current_values(base, SEARCH_SPACE[head]))
    records: list[TrialRecord] = []

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("t0", time.perf_counter())
        tcfg = with_tree(base, nest(suggest(trial, SEARCH_SPACE[head])))

        def report(row: dict) -> None:
            trial.report(row[key], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()
        return fit_fn(tcfg, store, report)[1].best_score

    def record(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        rec = TrialRecord(t.number, dict(t.params), t.value, t.state.name, dict(t.intermediate_values),
                          time.perf_counter() - t.user_attrs.get("t0", time.perf_counter()))
        records.append(rec)
        if on_trial:
            on_trial(rec)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=cfg.tune.n_trials, timeout=cfg.tune.timeout_s, callbacks=[record])
    best = study.best_trial
    return TuneResult(head, dict(best.params), float(best.value), records, tuned_tree(base, dict(best.params)))


def run_tuning(cfg: ExperimentConfig, head: str, store: FeatureStore, source_config: str | Path | None = None,
               fit_fn: FitFn = fit_head) -> TuneResult:
    """``tune_head`` with MLflow lineage (one parent run per (dataset, head), one child run per trial, logged as
    each trial ends) and the best parameters written to ``tuned_path``."""
    from stores.tracking import studies as tracking

    dataset = cfg.data.dataset_name
    budget = {"tune.n_trials": cfg.tune.n_trials, "tune.timeout_s": cfg.tune.timeout_s, "tune.seed": cfg.tune.seed,
              "tune.metric": cfg.tune.metric, "tune.prune": cfg.tune.prune, "train.epochs": cfg.train.epochs,
              "seed": cfg.seed, "store": store.name}
    parent = tracking.start_parent_run(cfg.tracking, dataset, f"tune-{head}", budget,
                                       {"head": head, "kind": "tune", "store_fingerprint": store.meta.fingerprint})

    def log_trial(t: TrialRecord) -> None:
        tracking.log_child_run(cfg.tracking, dataset, parent, f"tune-{head}-t{t.number}", t.params,
                               {"val_score": t.value, "seconds": t.seconds}, {"val_score_by_epoch": t.curve},
                               {"head": head, "kind": "tune-trial", "trial": str(t.number), "state": t.state},
                               status="FINISHED" if t.state == "COMPLETE" else "KILLED")
    try:
        result = tune_head(cfg, head, store, fit_fn, log_trial)
    except BaseException:
        tracking.end_parent_run(cfg.tracking, parent, status="FAILED")
        raise
    note = (f"tuned {head} on {dataset}: best validation score {result.best_value:.4f} (eval.select_on="
            f"{cfg.tune.metric}) after {len(result.trials)} trials, TPE seed {cfg.tune.seed}, {cfg.train.epochs} "
            f"max epochs; MLflow parent run {parent}")
    result.path = str(write_tuned(tuned_path(cfg, head), result.tree, source_config, note))
    tracking.end_parent_run(cfg.tracking, parent, {"best_val_score": result.best_value,
                                                   "trials_pruned": sum(t.state == "PRUNED" for t in result.trials)},
                            {"tuned.yaml": Path(result.path).read_text()},
                            {f"best.{k}": v for k, v in result.best_params.items()})
    return result
