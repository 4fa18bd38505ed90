"""Training loop and metrics on a real extracted store."""
import numpy as np
import pytest
import torch

from models.metrics import auroc, classification_metrics, expected_calibration_error, robustness_auc
from models.patterns import MissingPattern


def test_metrics_known_values():
    y = torch.tensor([0, 1, 2, 2])
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    m = classification_metrics(logits, y)
    assert m["acc"] == 0.75 and m["confusion"][2] == [0, 1, 1]
    assert m["per_class_f1"] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0
    assert robustness_auc([0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    ml = classification_metrics(torch.tensor([[3.0, -3.0], [3.0, 3.0]]), torch.tensor([[1, 0], [1, 0]]), "multilabel")
    assert ml["f1_micro"] == pytest.approx(0.8)


@pytest.mark.parametrize("head", ["early", "mmp"])
def test_training_is_deterministic_and_learns(colour_store, head):
    from models.heads import parse_head_config
    from runs.train import train_and_evaluate
    cfg, _ = colour_store
    cfg = cfg.model_copy(update={"head": parse_head_config({"name": head}),
                                 "train_pattern": MissingPattern(kind="per_modality", rates={"image": 0.3})})
    extra = MissingPattern(kind="per_modality", rates={"image": 0.5, "text": 0.5})
    a = train_and_evaluate(cfg)
    b = train_and_evaluate(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"extra_patterns": [extra]})}))
    assert [s.metrics["acc"] for s in a.scenarios] == [s.metrics["acc"] for s in b.scenarios[:-1]]
    assert a.fit.history == b.fit.history
    # an extra pattern is reported but moves neither the grid mean nor the robustness curves
    assert b.scenarios[-1].pattern == extra and b.scenarios[-1].metrics["acc"] != a.summary["grid_mean_acc"]
    assert {k: v for k, v in b.summary.items() if k != "val_acc"} == {k: v for k, v in a.summary.items() if k != "val_acc"}
    assert a.summary["complete_acc"] >= 0.6  # three colour classes; chance is 0.33
    assert {s.slug for s in a.scenarios} >= {"image-000/text-000", "image-100/text-000", "image-000/text-050"}


def test_noise_pattern_changes_features_not_presence(colour_store):
    from stores.features.feature_store import FeatureStore
    from stores.features.scenarios import ScenarioReader
    cfg, report = colour_store
    store = FeatureStore(cfg.store.root, report.store)
    reader = ScenarioReader(store, ("vec",), seed=0)
    split = reader.split("test")
    p = MissingPattern(kind="noise", sigma=1.0)
    a, b = reader.under("test", p), ScenarioReader(store, ("vec",), seed=0).under("test", p)
    assert torch.equal(a.vec["image"], b.vec["image"])  # seeded
    assert not torch.allclose(a.vec["image"], split.batch.vec["image"])
    assert torch.equal(a.present, split.batch.present)


def test_batches_cover_every_row_once_with_the_gathered_values(tmp_path):
    """Shuffled batches (numpy gather on CPU, also from a memory-mapped cache) and in-order batches (views) hold
    exactly the rows ``index_select`` would, every row once."""
    from models.features import take
    from models.heads.base import FeatureBatch
    from models.training import batches
    n = 37
    tok = np.random.default_rng(0).standard_normal((n, 5, 3)).astype(np.float16)
    np.save(tmp_path / "tok.npy", tok)
    data = FeatureBatch(torch.rand(n, 2) > 0.3, torch.arange(n), vec={"a": torch.randn(n, 4)},
                        tok={"a": torch.from_numpy(np.load(tmp_path / "tok.npy", mmap_mode="r+"))},
                        tok_mask={"a": torch.rand(n, 5) > 0.5}, emb={"b": torch.randn(n, 2, 2).bfloat16()})
    for gen in (torch.Generator().manual_seed(1), None):
        seen = []
        for b in batches(data, 8, gen):
            seen += b.y.tolist()
            ref = data.map(lambda t: t.index_select(0, b.y))
            for name, t in b.tensors().items():
                assert t.dtype == ref.tensors()[name].dtype and torch.equal(t, ref.tensors()[name]), name
        assert sorted(seen) == list(range(n)) and (gen is not None or seen == list(range(n)))
    assert torch.equal(take(data, torch.tensor([3, 3, 0])).y, torch.tensor([3, 3, 0]))
