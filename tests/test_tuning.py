"""Equal-budget tuning (Optuna + MLflow parent/child runs + Prefect), the unimodal oracle, gap_closed and the
protocol benchmark's pattern builders."""
import importlib.util
import json
from pathlib import Path

import optuna
import pytest
import torch

from models.config import ExperimentConfig, TrainConfig
from stores.config_files import load_config
from models.heads import HEADS, parse_head_config
from models.patterns import MissingPattern, presence_mask
from models.search_spaces import SEARCH_SPACE
from stores.features.feature_store import open_store
from runs.gap import add_gap_closed, gap_closed
from runs.train import fit_head, train_and_evaluate, used_rows
from runs.tune import suggest, tune_head, tuned_path
from stores.config_files import load_tuned, with_tree, write_tuned

ROOT = Path(__file__).resolve().parents[1]


def _protocols():
    spec = importlib.util.spec_from_file_location("protocols", ROOT / "bench" / "protocols.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_registered_head_has_a_search_space_of_real_fields(name):
    space = SEARCH_SPACE[name]
    head_fields, train_fields = HEADS[name].config_cls.model_fields, TrainConfig.model_fields
    for key in space:
        section, field = key.split(".")
        assert field in {"head": head_fields, "train": train_fields}[section], key
    assert any(k.startswith("head.") for k in space) and "train.lr" in space
    trial = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0)).ask()
    cfg = with_tree(load_config(None, [f"head.name={name}"]), {"head": {"name": name}, **_nest(suggest(trial, space))})
    assert cfg.head.name == name and cfg.train.lr == trial.params["train.lr"]


def _nest(flat):
    from stores.config_files import nest
    return nest(flat)


def _tune_cfg(colour_store, tmp_path, *extra):
    cfg, _ = colour_store
    return load_config(None, [f"{k}={v}" for k, v in cfg.flat().items() if k.startswith(("data.", "store.root"))
                              and v != "None"] + [
        "encoders.image.kind=efficientnet_lite0", "encoders.text.kind=minilm",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", f"tracking.artifact_root={tmp_path}/art",
        "train.epochs=2", "train.batch_size=16", "train.device=cpu", "tune.n_trials=2", "tune.prune=false",
        f"tune.out_dir={tmp_path}/tuned", *extra])


def test_objective_reads_train_and_val_only_and_returns_the_validation_score(colour_store, tmp_path):
    cfg = _tune_cfg(colour_store, tmp_path)
    store = open_store(cfg)
    read, fits = [], []
    real_read = store.read_split

    def spy_read(split, *a, **kw):
        read.append(split)
        return real_read(split, *a, **kw)
    store.read_split = spy_read

    def fit_fn(tcfg, st, on_epoch):
        head, fit = fit_head(tcfg, st, on_epoch)
        fits.append((tcfg, fit))
        return head, fit

    result = tune_head(cfg, "moddrop", store, fit_fn)
    assert "test" not in read and set(read) == {"train", "val"}
    assert [t.value for t in result.trials] == [f.best_score for _, f in fits]
    best = max(range(2), key=lambda i: fits[i][1].best_score)
    assert result.best_value == fits[best][1].best_score
    assert result.best_params == {k: getattr(fits[best][0].head if k.startswith("head.") else fits[best][0].train,
                                             k.split(".")[1]) for k in SEARCH_SPACE["moddrop"]}
    assert all(f[0].eval.select_on == "robust" for f in fits)
    first = fits[0][0]  # trial 0 runs the config's own settings
    assert (first.train.lr, first.head.p, first.head.hidden) == (cfg.train.lr, 0.5, 256)
    assert fits[1][0].train.lr != cfg.train.lr


def test_tune_flow_logs_parent_and_child_runs_and_writes_the_best_params(colour_store, tmp_path, prefect_harness,
                                                                         mlflow_db):
    from flows.tuning import tune_flow
    from stores.tracking.runs import Tracker
    from stores.tracking.studies import child_runs

    mlflow_db(tmp_path / "mlruns" / "mlflow.db")  # the tracking store _tune_cfg names, new and empty
    cfg = _tune_cfg(colour_store, tmp_path, "tune.heads=[early]")
    source = tmp_path / "base.yaml"
    source.write_text("head:\n  name: srmm\n")
    out = tune_flow(cfg, str(source))["early"]
    tracker = Tracker(cfg.tracking, cfg.data.dataset_name)
    parents = tracker.runs("tags.kind = 'tune'")
    assert len(parents) == 1 and parents.iloc[0]["tags.head"] == "early"
    children = child_runs(cfg.tracking, cfg.data.dataset_name, parents.iloc[0]["run_id"])
    assert len(children) == 2 and set(children["tags.kind"]) == {"tune-trial"}
    assert out.best_value == pytest.approx(children["metrics.val_score"].max())
    assert parents.iloc[0]["metrics.best_val_score"] == pytest.approx(out.best_value)
    best = children.loc[children["metrics.val_score"].idxmax()]
    assert float(best["params.train.lr"]) == pytest.approx(out.best_params["train.lr"])
    # the YAML runs as it is (it extends the tuned config) and as --set overrides
    path = Path(out.path)
    assert path.name == f"{cfg.data.dataset_name}-early.yaml"
    run_cfg = load_config(path)
    assert run_cfg.head.name == "early" and run_cfg.train.lr == pytest.approx(out.best_params["train.lr"])
    assert load_config(None, out.overrides).head.hidden == out.best_params["head.hidden"]
    assert load_tuned(path)["head"]["name"] == "early"


def test_oracle_trains_on_its_modality_only_and_ignores_the_others(colour_store, tmp_path):
    cfg = _tune_cfg(colour_store, tmp_path, "head.name=oracle", "head.modality=text", "train.epochs=3",
                    "train_pattern.kind=per_modality", "train_pattern.rates.text=0.5")
    store = open_store(cfg)
    result = train_and_evaluate(cfg, store)
    assert result.variant == "oracle[only:text]"
    slugs = {s.slug: s.metrics["acc"] for s in result.scenarios}
    assert slugs["image-100/text-000"] == slugs["image-000/text-000"]  # image never matters
    test = store.read_split("test", ("vec",)).batch
    shuffled = type(test)(test.present.clone(), test.y, dict(test.vec))
    shuffled.vec["image"] = torch.randn_like(test.vec["image"]) * 10
    shuffled.present[:, 0] = ~shuffled.present[:, 0]
    head = result.head.eval()
    with torch.no_grad():
        assert torch.equal(head(test).logits, head(shuffled).logits)
    # training keeps only rows whose text is present
    from models.heads import build_head
    spec = store.spec()
    oracle = build_head(parse_head_config({"name": "oracle", "modality": "text"}), spec)
    early = build_head(parse_head_config({"name": "early"}), spec)
    present = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    data = type(test)(present, torch.arange(4), {m: torch.zeros(4, spec.vec_dim[m]) for m in spec.modalities})
    assert used_rows(data, oracle, spec.modalities).y.tolist() == [0, 2]
    assert used_rows(data, early, spec.modalities).y.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not in the store's modalities"):
        build_head(parse_head_config({"name": "oracle", "modality": "audio"}), spec)


def test_gap_closed_on_hand_made_numbers():
    assert gap_closed(0.75, 0.5, 1.0) == 0.5 and gap_closed(0.5, 0.6, 0.6) is None
    assert gap_closed(0.9, 0.6, 0.605) is None and gap_closed(0.9, 0.6, 0.61) == pytest.approx(30)  # < 1 point: noise
    grid = lambda a_missing, t_missing: {"image-000/text-000": {"acc": 0.9}, "image-100/text-000": {"acc": a_missing},
                                         "image-000/text-100": {"acc": t_missing}}  # noqa: E731
    from models.records import RunRow
    row = lambda variant, scenarios: RunRow(variant, "complete", 0, scenarios, {})  # noqa: E731
    runs = [row("early", grid(0.40, 0.30)), row("early", grid(0.60, 0.30)),  # mean 0.50 at image missing
            row("oracle[only:text]", grid(0.70, 0.10)), row("oracle[only:image]", grid(0.10, 0.50)),
            row("mmp", grid(0.65, 0.45))]
    assert add_gap_closed(runs, "acc", ["image", "text"]) == ["gap_closed_image", "gap_closed_text"]
    mmp = runs[-1].summary
    assert mmp["gap_closed_image"] == pytest.approx((0.65 - 0.50) / (0.70 - 0.50))
    assert mmp["gap_closed_text"] == pytest.approx((0.45 - 0.30) / (0.50 - 0.30))
    assert runs[0].summary["gap_closed_image"] == pytest.approx(-0.5)  # early run 1: (0.4-0.5)/0.2
    assert "gap_closed_image" not in runs[2].summary  # the references get none
    # the sweep report aggregates it per head
    from runs.reporting import aggregate, markdown_table
    for r in runs:
        r.summary["grid_mean_acc"] = 0.5
    scenarios, rows = aggregate(runs, "acc")
    table = markdown_table(scenarios, rows)
    assert "gap_closed_image" in table.splitlines()[0]
    assert next(r for r in rows if r["head"] == "mmp")["gap_closed_image"][0] == pytest.approx(0.75)


def test_protocol_runs_of_a_head_with_no_tuned_file_are_shared_by_the_default_and_tuned_reports(tmp_path):
    p = _protocols()
    base = load_config(None, [f"tune.out_dir={tmp_path}"])
    write_tuned(tuned_path(base, "srmm"), {"head": {"name": "srmm", "embed_scale": 8.0}, "train": {"lr": 2e-3}},
                None, "test")
    train, seed = MissingPattern(), 0
    for head, tuned_file in (({"name": "srmm"}, True), ({"name": "moddrop"}, False),
                             ({"name": "oracle", "modality": "image"}, False)):
        assert p.tuned_applies(base, head, True) is tuned_file and not p.tuned_applies(base, head, False)
        plain, tuned = (p.run_config(base, head, train, [], seed, t, None) for t in (False, True))
        keys = {p.run_key(head, train, seed, None, p.tuned_applies(base, head, t)) for t in (False, True)}
        # a tuned file changes the config and gets its own runs; without one the config and the run are the same
        assert (plain != tuned) is tuned_file and len(keys) == (2 if tuned_file else 1)
    assert p.run_config(base, {"name": "srmm"}, train, [], seed, True, None).head.embed_scale == 8.0


def test_protocol_pattern_builders_give_the_exact_availability_levels():
    p = _protocols()
    mods, n = ["image", "text"], 1000

    def avail(pattern):
        return presence_mask(pattern, mods, n, "test", 0).mean(0).round(3).tolist()
    (train_c, tests_c), = p.protocol_patterns("c", mods, ["image"])
    assert train_c.kind == "complete"
    assert [avail(t) for t in tests_c] == [[a, 1.0] for a in [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]]
    (train_d, tests_d), = p.protocol_patterns("d", mods)
    assert [avail(t) for t in tests_d] == [[1.0, 1.0], [1.0, 0.3], [1.0, 0.0], [0.65, 0.65], [0.3, 1.0], [0.0, 1.0]]
    assert all(presence_mask(t, mods, n, "test", 0).any(1).all() for t in tests_d)  # no row loses both
    a = p.protocol_patterns("a", mods)
    assert [(tr.key, [t.key for t in ts]) for tr, ts in a] == [
        (f"map[{t}=70]", [f"map[{t}=70]"]) for t in ["image", "text", "both"]]
    assert [avail(tr) for tr, _ in a] == [[0.3, 1.0], [1.0, 0.3], [0.65, 0.65]]
    b = p.protocol_patterns("b", mods)
    assert len(b) == 3 and all(len(ts) == 3 for _, ts in b)
    plan = p.training_plan(["a", "b", "c", "d"], mods)  # a/b and c/d share their trainings
    assert sorted(plan) == ["complete", "map[both=70]", "map[image=70]", "map[text=70]"]
    assert len(plan["complete"][1]) == 7 + 6 - 3  # (100,100), (30,100), (0,100) are in both c and d


def test_protocol_heads_expand_oracles_per_modality_and_lora_oracles_where_the_encoder_has_blocks():
    specs = _protocols().head_specs(["mmp", "oracle", "oracle-lora"], ["image", "text"], ["text"])
    assert specs == [{"name": "mmp"}, {"name": "oracle", "modality": "image"}, {"name": "oracle", "modality": "text"},
                     {"name": "oracle", "modality": "text", "backbone": "encoder+lora"}]
    assert [parse_head_config(s).label for s in specs[1:]] == ["oracle-image", "oracle-text", "oracle-text-lora"]
    lora = _protocols().head_specs(["moddrop-lora", "early", "mmp-lora"], ["image", "text"], ["text"])
    assert lora == [{"name": "moddrop", "backbone": "encoder+lora"}, {"name": "early"},
                    {"name": "mmp", "backbone": "encoder+lora"}]
    assert parse_head_config(lora[0]).label == "moddrop-lora"
    assert _protocols().head_specs(["moddrop-lora"], ["image", "audio"], []) == []  # no encoder has blocks


def test_cmpt_runs_its_own_path_and_the_trainable_block_rows_are_a_labelled_ablation_beside_it():
    p = _protocols()
    assert "cmpt-block" in p.HEADS  # the protocol tables carry the ablation by default
    specs = p.head_specs(["cmpt", "cmpt-block"], ["image", "text"], ["text"])
    assert specs == [{"name": "cmpt"}, {"name": "cmpt", "backbone": "trainable_block"}]
    assert [parse_head_config(s).label for s in specs] == ["cmpt", "cmpt-block"]  # apart in the registry too
    assert p.head_specs(["cmpt-block"], ["image", "audio"], []) == []  # no blocks: cmpt is that variant already
    base = ExperimentConfig.model_validate({"data": {"dataset": "avmnist"}})
    assert p.with_paper_rows(base, specs[1:], False) == specs[1:]  # no paper-constants row for an ablation


def test_protocol_verdict_keeps_a_lora_baseline_apart_from_the_baseline_the_bar_is_against():
    p = _protocols()

    def run(head, variant, complete, grid):
        return {"head": head["name"], "variant": variant, "train_pattern": "complete",
                "key": json.dumps([head, "complete", 0, None, True]),
                "summary": {"complete_acc": complete, "grid_mean_acc": grid}}

    lora_head = {"name": "moddrop", "backbone": "encoder+lora"}
    results = [run(h, v, c + d, g + d) for d in (0.0, 0.002, -0.002) for h, v, c, g in [
        ({"name": "moddrop"}, "moddrop", 0.80, 0.70), ({"name": "early"}, "early", 0.81, 0.68),
        (lora_head, "moddrop[backbone:encoder+lora,streams:text]", 0.90, 0.78),
        ({"name": "cmpt"}, "cmpt[text:encoder+lora]", 0.89, 0.77)]]
    text, flat = p.verdict_table(results)
    assert "best baseline on complete data: early" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[4:]}
    assert flat["verdict/moddrop/grid_mean"] == pytest.approx(70.0)  # not pooled with the LoRA runs
    assert flat["verdict/moddrop-lora/complete"] == pytest.approx(90.0)
    assert "| +8.0 ± " in rows["cmpt[text:encoder+lora]"] and "| yes | 3 |" in rows["cmpt[text:encoder+lora]"]
    lora = rows["moddrop[backbone:encoder+lora,streams:text]"]
    assert lora.endswith("|  | 3 |")  # listed, no verdict of its own


def test_protocol_runs_select_on_the_train_pattern_and_name_robust_selection_a_deviation(tmp_path):
    from models.paper import deviations
    p = _protocols()
    base = load_config(None, [f"tune.out_dir={tmp_path}"])
    train, head = p.map_pattern("image"), {"name": "moddrop"}
    paper = p.run_config(base, head, train, [], 0, False, None)
    assert paper.eval.select_on == "train_pattern" and paper.eval.paper_protocol  # 001 A4: MAP's selection
    assert deviations(paper.head, paper.train, paper.eval) == []
    robust = p.run_config(base, head, train, [], 0, False, None, "robust")
    assert robust.eval.select_on == "robust" and deviations(robust.head, robust.train, robust.eval) == ["select=robust"]
    assert p.run_key(head, train, 0, None, False) != p.run_key(head, train, 0, None, False, "robust")
    assert deviations(base.head, base.train, base.eval) == deviations(base.head, base.train)  # not a protocol run


def test_run_label_names_the_heads_deviations_then_the_configs():
    from models.heads import ModalitySpec, build_head
    from runs.train import run_variant
    cfg = load_config(None, ["head.name=srmm", "eval.paper_protocol=true"])
    spec = ModalitySpec(["audio", "image"], {"audio": 8, "image": 16}, {}, {}, n_classes=3)
    label, named = run_variant(cfg, build_head(cfg.head, spec), ["audio", "image"])
    assert named == ["per_modality_proj", "hidden=512", "embed_scale=16", "optimizer=adamw", "lr=0.001",
                     "weight_decay=0.01", "select=robust"]
    assert label == "srmm[switch:S-1,deviation:" + "+".join(named) + "]"
    early = load_config(None, ["head.name=early"])
    assert run_variant(early, build_head(early.head, spec), ["audio", "image"]) == ("early", [])


def test_protocol_c_removes_what_004_removes_and_the_other_direction_is_a_labelled_extra():
    p = _protocols()
    assert p.c_modality(["image", "text"]) == "text" and p.c_modality(["audio", "image"]) == "audio"
    assert p.c_modalities(["image", "text"], "other") == ["image"]
    assert p.c_modalities(["audio", "image"], "both") == ["audio", "image"]
    for mods, removed in ((["image", "text"], 1), (["audio", "image"], 0)):
        (train, tests), = p.protocol_patterns("c", mods)
        avail = [presence_mask(t, mods, 1000, "test", 0).mean(0).round(3).tolist() for t in tests]
        assert train.kind == "complete" and [a[removed] for a in avail] == [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
        assert all(a[1 - removed] == 1.0 for a in avail)
    assert p.c_title("text", ["image", "text"]).startswith("c) ") and "EXTRA" not in p.c_title("text", ["image", "text"])
    assert p.c_title("image", ["image", "text"]).startswith("c-other) ") and "EXTRA" in p.c_title("image", ["image", "text"])


def test_protocol_heads_get_a_paper_constants_row_where_their_config_differs(tmp_path):
    p = _protocols()
    base = load_config(None, [f"tune.out_dir={tmp_path}"])  # avmnist: audio + image
    names = ["early", "late", "srmm", "mmp", "cmpt"]
    specs = p.with_paper_rows(base, [{"name": n} for n in names], False)
    # cmpt's and late's defaults are their papers' head values, and they train on the same recipe: no second row
    assert specs == [{"name": "early"}, {"name": "late"}, {"name": "srmm"}, {"name": "srmm", "paper": True},
                     {"name": "mmp"}, {"name": "mmp", "paper": True}, {"name": "cmpt"}]
    srmm = p.run_config(base, {"name": "srmm", "paper": True}, MissingPattern(), [], 0, True, None)
    assert srmm.head.hidden == 2048 and srmm.head.embed_scale == 1.0  # 004 §IV-B audio-visual layer_dim
    assert p.spec_label({"name": "srmm", "paper": True}) == "srmm-paper"
    assert p.key_head({"name": "mmp", "paper": True}, ["audio", "image"])["mask_per"] == "batch"
    write_tuned(tuned_path(base, "cmpt"), {"head": {"name": "cmpt", "lam": 0.85}}, None, "test")
    tuned = p.with_paper_rows(base, [{"name": "cmpt"}], True)
    assert tuned == [{"name": "cmpt"}, {"name": "cmpt", "paper": True}]  # beside the tuned row
    assert not p.tuned_applies(base, tuned[1], True)
    rows = [{"variant": v, "train_pattern": "complete", "key": json.dumps([h, "complete", s, None, False, "paper"]),
             "summary": {"complete_acc": c + s / 100, "grid_mean_acc": g}} for s in (0, 1)
            for h, v, c, g in [({"name": "moddrop"}, "moddrop", 0.8, 0.7), ({"name": "early"}, "early", 0.8, 0.6),
                               ({"name": "late"}, "late", 0.8, 0.6), ({"name": "srmm"}, "srmm[a]", 0.8, 0.72),
                               (p.key_head({"name": "srmm", "paper": True}, []), "srmm[b]", 0.7, 0.6)]]
    text, flat = p.verdict_table(rows)
    assert "| paper constants: srmm[b] |" in text and flat["verdict/srmm-paper/grid_mean"] == pytest.approx(60.0)
    verdict = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[-2] for line in text.splitlines()[4:]}
    assert verdict["paper constants: srmm[b]"] == "no" and verdict["srmm[a]"] == "yes"  # held to the same bar


def test_gap_references_keep_their_role_whatever_deviations_they_carry():
    from models.records import RunRow
    grid = {"image-000/text-000": {"acc": 0.9}, "image-100/text-000": {"acc": 0.5}, "image-000/text-100": {"acc": 0.3}}
    runs = [RunRow("early[deviation:select=robust]", "complete", 0, grid, {}),
            RunRow("oracle[only:text,deviation:select=robust]", "complete", 0, {"image-100/text-000": {"acc": 0.7}}, {}),
            RunRow("mmp[deviation:select=robust]", "complete", 0, {"image-100/text-000": {"acc": 0.6}}, {})]
    assert add_gap_closed(runs, "acc", ["image", "text"]) == ["gap_closed_image"]
    assert runs[2].summary["gap_closed_image"] == pytest.approx(0.5)


def test_pipeline_tunes_every_head_first_and_sweeps_with_the_tuned_settings(colour_store, tmp_path, prefect_harness,
                                                                             mlflow_db):
    """``sweep.tune_first``: the tune section's budget per head, then the sweep runs (named ``-tuned``) with
    the tuned values, written as ``mm tune`` writes them."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline_flow
    mlflow_db(tmp_path / "mlruns" / "mlflow.db")  # the tracking store _tune_cfg names, new and empty
    cfg = _tune_cfg(colour_store, tmp_path, "sweep.heads=[{name: early}]", "sweep.seeds=[0]", "tune.n_trials=1",
                    "sweep.tune_first=true", "sweep.max_parallel=1", "eval.test_rates=[0.0,1.0]")
    out = pipeline_flow(cfg, version=False)
    tuned = load_tuned(tmp_path / "tuned" / f"{cfg.data.dataset_name}-early.yaml")
    [row] = out.sweep.results
    run = MlflowClient(cfg.tracking.uri).get_run(row.run_id)
    assert run.info.run_name.endswith("-tuned") and run.data.params["train.lr"] == str(tuned["train"]["lr"])
