import numpy as np
import pytest

from models.patterns import MissingPattern, presence_mask, robustness_grid, scenario_slug

MODS = ["image", "text"]


def test_per_modality_rates_are_exact_and_seeded():
    p = MissingPattern(kind="per_modality", rates={"image": 0.3, "text": 0.5})
    a = presence_mask(p, MODS, 1000, "train", 0)
    assert a.shape == (1000, 2)
    assert np.array_equal(a, presence_mask(p, MODS, 1000, "train", 0))
    assert not np.array_equal(a, presence_mask(p, MODS, 1000, "train", 1))
    assert not np.array_equal(a, presence_mask(p, MODS, 1000, "test", 0))
    assert a.any(1).all()  # nobody loses every modality unless allowed
    assert abs((~a[:, 0]).mean() - 0.3) < 0.03 and abs((~a[:, 1]).mean() - 0.5) < 0.06


def test_allow_all_missing_keeps_rows_empty():
    p = MissingPattern(kind="per_modality", rates={"image": 0.5, "text": 0.5}, allow_all_missing=True)
    a = presence_mask(p, MODS, 1000, "test", 0)
    assert (~a.any(1)).sum() > 100


def test_map_protocol_both_splits_eta_disjointly():
    p = MissingPattern(kind="map", eta=0.7, mp_type="both")
    a = presence_mask(p, MODS, 1000, "train", 0)
    assert (~a[:, 0]).sum() == 350 and (~a[:, 1]).sum() == 350
    assert a.any(1).all()
    single = presence_mask(MissingPattern(kind="map", eta=0.7, mp_type="text"), MODS, 1000, "train", 0)
    assert (~single[:, 1]).sum() == 700 and single[:, 0].all()


def test_simultaneous_absent_noise_and_many_modalities():
    mods = ["image", "text", "audio"]
    sim = presence_mask(MissingPattern(kind="simultaneous", rate=0.2), mods, 500, "test", 0)
    assert (~sim.any(1)).sum() == 100 and (sim.all(1) | ~sim.any(1)).all()
    absent = presence_mask(MissingPattern(kind="absent", modality="audio"), mods, 50, "test", 0)
    assert not absent[:, 2].any() and absent[:, :2].all()
    noise = presence_mask(MissingPattern(kind="noise", sigma=0.5), mods, 50, "test", 0)
    assert noise.all()
    grid = robustness_grid(mods, [0.0, 0.5, 1.0])
    assert len(grid) == 1 + 3 * 2


def test_unknown_modality_is_rejected():
    with pytest.raises(ValueError, match="unknown modalities"):
        presence_mask(MissingPattern(kind="absent", modality="video"), MODS, 10, "test", 0)


def test_scenario_slugs_are_mlflow_safe_and_distinct():
    from mlflow.utils.validation import validate_param_and_metric_name as ok
    pats = [MissingPattern(), MissingPattern(kind="per_modality", rates={"image": 0.3}),
            MissingPattern(kind="map", eta=0.7), MissingPattern(kind="simultaneous", rate=0.5),
            MissingPattern(kind="noise", sigma=0.1)]
    slugs = [scenario_slug(p, MODS) for p in pats]
    assert slugs[0] == "image-000/text-000" and slugs[1] == "image-030/text-000"
    assert len(set(slugs)) == len(slugs) and all(ok(f"test/acc/{s}") for s in slugs)
    assert scenario_slug(MissingPattern(kind="absent", modality="text"), MODS) == "image-000/text-100"
