"""Scoring a head under many missing patterns once per set of kept modalities (runs/scenario_logits.py) gives the
logits a direct ``predict`` under each pattern gives, for every kind of head, on a store whose own data has
missing inputs."""
from __future__ import annotations

import pytest
import torch

from models.patterns import MissingPattern, robustness_grid

PATTERNS = [*robustness_grid(["image", "text"], [0.0, 0.5, 1.0]),
            MissingPattern(kind="per_modality", rates={"image": 0.5, "text": 0.5}, allow_all_missing=True),
            MissingPattern(kind="simultaneous", rate=0.3),
            MissingPattern(kind="map", eta=0.7, mp_type="both"),
            MissingPattern(kind="absent", modality="text"),
            MissingPattern(kind="burst", modality="image", rate=0.4, burst_len=3),
            MissingPattern(kind="noise", sigma=0.5)]


@pytest.mark.parametrize("head", [{"name": "early"}, {"name": "late"}, {"name": "moddrop"}, {"name": "srmm"},
                                  {"name": "mmp"}, {"name": "cmpt"}, {"name": "oracle", "modality": "image"}])
def test_logits_shared_across_patterns_equal_a_direct_predict(colour_store, head):
    from models.heads import build_head, parse_head_config
    from models.training import predict
    from runs.scenario_logits import ScenarioLogits
    from stores.encoders import load_backbones
    from stores.features.feature_store import open_store
    from stores.features.scenarios import ScenarioReader

    cfg, _ = colour_store
    cfg = cfg.model_copy(update={"head": parse_head_config(head)})
    store = open_store(cfg)
    torch.manual_seed(0)
    model = build_head(cfg.head, store.spec(), load_backbones(cfg.head, cfg.encoder_configs(), store.meta.emb_dim))
    reader = ScenarioReader(store, tuple(model.inputs), seed=0)
    assert not bool(reader.split("test").batch.present.all())  # the data's own missing inputs are in play
    shared = ScenarioLogits(model, reader, cfg.train)
    for pattern in PATTERNS:
        for split in ("test", "val"):
            direct = predict(model, reader.under(split, pattern), cfg.train)
            got, data = shared.under(split, pattern)
            assert got.shape == direct.shape and torch.allclose(got, direct, atol=1e-5), (split, pattern.key)
            assert torch.equal(data.y, reader.split(split).batch.y)
    # two modalities: at most 4 kept sets per split, and the noise pattern's own pass on each split
    assert shared.passes <= 2 * 4 + 2


def test_the_grid_and_the_calibration_of_a_run_share_their_passes(colour_store):
    """A two-modality grid (complete, each modality at 3 rates) and the 3 calibration patterns: one pass per
    split and kept set (test: 3, val: 3) instead of one per pattern (test 7 + 3, val 3 x 2)."""
    from models.heads import build_head, parse_head_config
    from runs.train import calibrate, evaluate_grid, scenario_logits
    from stores.encoders import load_backbones
    from stores.features.feature_store import open_store

    cfg, _ = colour_store
    cfg = cfg.model_copy(update={"head": parse_head_config({"name": "early"}),
                                 "eval": cfg.eval.model_copy(update={"test_rates": [0.0, 0.3, 0.7, 1.0]})})
    store = open_store(cfg)
    model = build_head(cfg.head, store.spec(), load_backbones(cfg.head, cfg.encoder_configs(), store.meta.emb_dim))
    logits = scenario_logits(cfg, model, store)
    scenarios = evaluate_grid(cfg, model, store, logits)
    temperatures, ece = calibrate(cfg, model, store, logits)
    assert len(scenarios) == 7 and len(temperatures) == 3 and logits.passes == 6
    # the same numbers as each helper scoring on its own
    assert [s.metrics for s in evaluate_grid(cfg, model, store)] == [s.metrics for s in scenarios]
    assert calibrate(cfg, model, store) == (temperatures, ece)
