"""Every registered head: shapes, missing rows, gradients only where trainable, state-dict round trip."""
import pytest
import torch

from models.heads import HEADS, FeatureBatch, ModalitySpec, build_head, parse_head_config
from models.lora import LoRALinear, apply_lora

SPEC = ModalitySpec(["image", "text"], {"image": 16, "text": 8}, {"image": 12, "text": 6}, {"image": 5, "text": 7},
                    n_classes=4, emb_dim={"text": 32}, emb_len={"text": 7},
                    placeholder_vec={"image": torch.zeros(16), "text": torch.ones(8)})


def batch(n=10, present=None) -> FeatureBatch:
    g = torch.Generator().manual_seed(0)
    present = torch.ones(n, 2, dtype=torch.bool) if present is None else present
    tok_mask = {"image": torch.ones(n, 5, dtype=torch.bool), "text": torch.arange(7)[None] < torch.randint(1, 8, (n, 1), generator=g)}
    return FeatureBatch(present, torch.randint(0, 4, (n,), generator=g),
                        {"image": torch.randn(n, 16, generator=g), "text": torch.randn(n, 8, generator=g)},
                        {"image": torch.randn(n, 5, 12, generator=g), "text": torch.randn(n, 7, 6, generator=g)},
                        tok_mask, {"text": torch.randn(n, 7, 32, generator=g)}, {"text": tok_mask["text"]})


def tiny_blocks():
    from transformers import BertConfig, BertModel
    from stores.encoders.hf import HFBlocks
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    return HFBlocks(bert.encoder.layer, 32)


VARIANTS = {"mmp-lora": ("mmp", {"backbone": "encoder+lora"})}  # head configs with encoder blocks, by label
CASES = sorted(HEADS) + sorted(VARIANTS)


def make(name, **kw):
    name, extra = VARIANTS.get(name, (name, {}))
    cfg = parse_head_config({"name": name, **extra, **kw})
    backbones = {"text": tiny_blocks()} if cfg.encoder_blocks != "none" else None
    torch.manual_seed(0)
    return build_head(cfg, SPEC, backbones)


MIXED = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1], [1, 0], [0, 1], [1, 1], [1, 1], [0, 1]], dtype=torch.bool)


@pytest.mark.parametrize("name", CASES)
def test_shapes_and_missing_rows(name):
    head = make(name).eval()
    out = head(batch(10, MIXED))
    assert out.logits.shape == (10, 4) and out.aux_loss.dim() == 0
    assert torch.isfinite(out.logits).all()
    # a missing modality's features must not matter where another modality is present (rows with nothing
    # present fall back to every placeholder by design)
    rows = ~MIXED[:, 0] & MIXED[:, 1]
    b2 = batch(10, MIXED)
    b2.vec["image"][rows] += 100
    b2.tok["image"][rows] += 100
    assert torch.allclose(head(b2).logits[rows], out.logits[rows], atol=1e-4), name


@pytest.mark.parametrize("name", CASES)
def test_training_step_gradients_only_on_trainable(name):
    head = make(name).train()
    out = head(batch(12))
    y = batch(12).y if out.target_index is None else batch(12).y[out.target_index]
    loss = torch.nn.functional.cross_entropy(out.logits, y) + out.aux_loss
    loss.backward()
    trainable = [p for p in head.parameters() if p.requires_grad]
    frozen = [p for p in head.parameters() if not p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in frozen)
    if name == "mmp-lora":
        assert frozen and {type(m) for m in head.streams.modules()} >= {LoRALinear}
    if name == "cmpt":
        assert frozen, "CMPT's encoder blocks must stay frozen"
        lora = [m for m in head.modules() if isinstance(m, LoRALinear)]
        assert len(lora) == 2 * 4  # q, k, v, o in each of the 2 blocks
        assert head.variant == {"image": "trainable_block+learned_cls", "text": "encoder+lora",
                                "deviation": "trainable_block=image+width_map+fusion_proj"}


@pytest.mark.parametrize("name", CASES)
def test_state_dict_round_trip(name):
    a, b = make(name).eval(), make(name, **({"dropout": 0.1} if name != "moddrop" else {})).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.5)
    b.load_state_dict(a.state_dict())
    x = batch(6, MIXED[:6])
    assert torch.allclose(a(x).logits, b(x).logits, atol=1e-5)


def test_mmp_aligns_masked_modalities_and_replaces_missing_tokens():
    head = make("mmp", mask_p=1.0).train()  # mask all but one present modality per row
    out = head(batch(16))
    assert out.aux_loss > 0
    head.eval()
    assert head(batch(16)).aux_loss == 0  # nothing masked at inference when all present


def test_cmpt_alignment_only_on_complete_rows():
    head = make("cmpt").train()
    none_complete = torch.tensor([[1, 0], [0, 1]] * 4, dtype=torch.bool)
    assert head(batch(8, none_complete)).aux_loss == 0
    assert head(batch(8)).aux_loss > 0


def test_cmpt_reports_the_norms_of_its_proxies_and_targets_per_epoch():
    """Eq. 4's MSE can fall by shrinking both sides (no stop-gradient): the sizes of both are in the history."""
    from models.config import TrainConfig
    from models.training import fit
    head = make("cmpt").train()
    out = head(batch(8))
    assert set(out.stats) == {"proxy_norm", "target_norm"} and all(v > 0 for v in out.stats.values())
    assert make("cmpt").eval()(batch(8)).stats == {}
    data = batch(16, MIXED.repeat(2, 1)[:16])
    history = fit(head, data, data, TrainConfig(epochs=2, batch_size=8, device="cpu"), seed=0).history
    assert all(row["proxy_norm"] > 0 and row["target_norm"] > 0 for row in history) and len(history) == 2


def test_cmpt_encoder_backbone_requires_blocks():
    with pytest.raises(ValueError, match="no encoder blocks"):
        build_head(parse_head_config({"name": "cmpt", "backbone": "encoder"}), SPEC, {})


@pytest.mark.parametrize("strategy", ["S-1", "S-2", "S-3", "all_present_rows"])
def test_srmm_strategies(strategy):
    head = make("srmm", strategy=strategy).train()
    out = head(batch(10, MIXED))
    if strategy == "all_present_rows":  # every present (row, modality) pair; the all-missing row uses both
        assert out.logits.shape[0] == int(MIXED.sum()) + 2
    elif strategy == "S-1":
        assert out.logits.shape[0] == 10
    else:  # a unimodal batch uses only the rows holding its modality (S-2: half the batches)
        assert out.logits.shape[0] <= 10
    assert (out.target_index < 10).all()


def test_lora_starts_as_identity_and_freezes_base():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8))
    x = torch.randn(3, 8)
    before = lin(x)
    names = apply_lora(lin, ("0",), rank=1)
    assert names == ["0"] and torch.allclose(lin(x), before)
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == ["0.lora_a", "0.lora_b"]
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), ("query",))


def test_pool_tokens_is_mask_aware():
    from models.heads.base import pool_tokens
    x = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(2, 1, 1)
    mask = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    y, m = pool_tokens(x, mask, 4)  # windows of 3: [0,1,2] [3,4,5] [6,7,8] [9,pad,pad]
    assert y.shape == (2, 4, 1) and y[0, :, 0].tolist() == [1.0, 4.0, 7.0, 9.0]
    assert m[1].tolist() == [True, False, False, False] and y[1, 0, 0] == 1.0
    same, same_m = pool_tokens(x, mask, 16)
    assert same is x and same_m is mask


def test_late_fusion_averages_the_present_modalities_only():
    """004 §III-B fuses what is present: a row missing a modality gets the present branch's logits alone; zero-fill
    averaging over every branch is the named variant ``late_average="all"``."""
    head, b = make("late").eval(), batch(10, MIXED)
    with torch.no_grad():
        vecs = head.filled(b, b.present)
        per = {m: head.branches[m](vecs[m]) for m in SPEC.modalities}
        out = head(b).logits
        for i, m in enumerate(SPEC.modalities):
            alone = MIXED[:, i] & ~MIXED[:, 1 - i]
            assert torch.allclose(out[alone], per[m][alone], atol=1e-6)
        both = MIXED.all(1) | ~MIXED.any(1)  # a row with nothing present averages every placeholder's branch
        assert torch.allclose(out[both], (per["image"][both] + per["text"][both]) / 2, atol=1e-6)
        zero_fill = make("late", late_average="all").eval()
        assert torch.allclose(zero_fill(b).logits, (per["image"] + per["text"]) / 2, atol=1e-6)


def test_srmm_fuses_the_mean_softmax_of_the_present_modalities():
    """004 §III-B averages the softmax outputs: the logits are the log of the mean probability over present
    modalities; averaging logits is the named variant ``fusion="logit"``."""
    from models.heads.base import usable
    head, b = make("srmm").eval(), batch(10, MIXED)
    w = usable(MIXED).T.unsqueeze(-1).float()
    with torch.no_grad():
        logits = head.all_logits(b)
        want = (torch.softmax(logits, -1) * w).sum(0) / w.sum(0)
        out = head(b).logits
        assert torch.allclose(out, want.log(), atol=1e-5)
        assert torch.allclose(out.exp().sum(-1), torch.ones(10), atol=1e-5)  # cross-entropy reads it as is
        assert torch.equal(out.argmax(-1), want.argmax(-1))
        only_image = MIXED[:, 0] & ~MIXED[:, 1]
        assert torch.allclose(out[only_image], torch.log_softmax(logits[0][only_image], -1), atol=1e-5)
        by_logit = make("srmm", fusion="logit").eval()
        assert torch.allclose(by_logit(b).logits, (logits * w).sum(0) / w.sum(0), atol=1e-5)
