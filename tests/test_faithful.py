"""Heads and patterns against their papers (000 MMP §III, 001 CMPT §3/A3, 004 SRMM §III-B/§V-C, Table IX)."""
import numpy as np
import pytest
import torch

from models.features import add_noise
from models.heads import FeatureBatch, ModalitySpec, build_head, parse_head_config
from models.paper import deviations
from models.patterns import MissingPattern, presence_mask, scenario_slug

# ------------------------------------------------------------------------------------------------ SRMM §V-C
SPEC2 = ModalitySpec(["image", "text"], {"image": 8, "text": 8}, {"image": 4, "text": 4}, {"image": 3, "text": 3},
                     n_classes=3)


def srmm(strategy=None, **kw):
    torch.manual_seed(0)
    cfg = {"name": "srmm", **({"strategy": strategy} if strategy else {}), **kw}
    return build_head(parse_head_config(cfg), SPEC2).train()


def composition(head, present, steps=400):
    """Per step: (rows used, modality per row)."""
    return [head.switch(present) for _ in range(steps)]


def test_srmm_default_is_paper_s1_with_paper_branch_sizes():
    head = srmm()
    assert head.cfg.strategy == "S-1" and head.variant["switch"] == "S-1"
    assert head.fc2.out_features == head.cfg.hidden == head.cls.in_features  # FC sizes {in, L, L, C} (§IV-B)
    assert "embed_scale=16" in deviations(head.cfg) and "deviation" not in head.variant  # named by models.paper
    assert srmm(embed_scale=1.0).variant == {"switch": "S-1"}


def test_srmm_s1_mixes_modalities_within_every_batch():
    present = torch.ones(16, 2, dtype=torch.bool)
    steps = composition(srmm("S-1"), present)
    assert all(torch.equal(rows, torch.arange(16)) for rows, _ in steps)
    mixed = np.mean([len(set(cols.tolist())) == 2 for _, cols in steps])
    assert mixed > 0.99  # multimodal batches: per-sample choice
    share = torch.cat([cols for _, cols in steps]).float().mean()
    assert abs(share - 0.5) < 0.03


def test_srmm_s2_half_the_batches_are_unimodal_in_random_order():
    present = torch.ones(16, 2, dtype=torch.bool)
    steps = composition(srmm("S-2"), present, steps=600)
    unimodal = np.array([len(set(cols.tolist())) == 1 for _, cols in steps])
    assert abs(unimodal.mean() - 0.5) < 0.07
    assert 0.3 < np.diff(unimodal.astype(int)).__ne__(0).mean() < 0.7  # interleaved, not blocks or alternation
    uni_mod = [int(cols[0]) for (_, cols), u in zip(steps, unimodal) if u]
    assert abs(np.mean(uni_mod) - 0.5) < 0.1  # a random modality per unimodal batch


def test_srmm_s3_every_batch_is_unimodal_with_a_random_modality():
    present = torch.ones(16, 2, dtype=torch.bool)
    steps = composition(srmm("S-3"), present)
    assert all(len(set(cols.tolist())) == 1 and len(rows) == 16 for rows, cols in steps)
    chosen = np.array([int(cols[0]) for _, cols in steps])
    assert abs(chosen.mean() - 0.5) < 0.08 and 0.3 < (np.diff(chosen) != 0).mean() < 0.7


def test_srmm_unimodal_batch_skips_rows_lacking_the_modality():
    present = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    head = srmm("S-3")
    for rows, cols in composition(head, present, 50):
        m = int(cols[0])
        assert torch.equal(rows, present[:, m].nonzero().flatten()) and (cols == m).all()
    g = torch.Generator().manual_seed(0)
    batch = FeatureBatch(present, torch.randint(0, 3, (6,), generator=g),
                         {"image": torch.randn(6, 8, generator=g), "text": torch.randn(6, 8, generator=g)})
    out = head(batch)
    assert out.logits.shape[0] == len(out.target_index) == 4


def test_srmm_all_present_rows_is_the_named_non_paper_variant():
    present = torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    head = srmm("all_present_rows")
    rows, cols = head.switch(present)
    assert rows.tolist() == [0, 0, 1, 2] and cols.tolist() == [0, 1, 0, 1]
    assert head.variant["switch"] == "all_present_rows(non-paper)"


# ------------------------------------------------------------------------------------------------ MMP Eq. 6
def test_mmp_alignment_is_averaged_over_masked_modalities():
    mods = ["a", "b", "c"]
    spec = ModalitySpec(mods, {m: 4 for m in mods}, {m: 4 for m in mods}, {m: 3 for m in mods}, n_classes=2)
    torch.manual_seed(0)
    head = build_head(parse_head_config({"name": "mmp", "mask_p": 1.0, "d_model": 8, "n_heads": 2}), spec).train()
    target = {"a": 0.2, "b": 0.4, "c": 0.6}
    with torch.no_grad():  # projected tokens are the constant c_m; real tokens are 0: Smooth-L1 = c^2 / 2
        for m, c in target.items():
            head.out[m][-1].weight.zero_()
            head.out[m][-1].bias.fill_(c)
    n = 32
    batch = FeatureBatch(torch.ones(n, 3, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
                         tok={m: torch.zeros(n, 3, 4) for m in mods},
                         tok_mask={m: torch.ones(n, 3, dtype=torch.bool) for m in mods})
    out = head(batch)  # mask_p=1: every row keeps one modality, so all three are masked somewhere
    expected = np.mean([c * c / 2 for c in target.values()])
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-5)


def test_mmp_masks_once_per_batch_when_asked_as_000_iii_a_does():
    """000 §III-A: each modality available or masked at each iteration (``mask_per="batch"``): one draw for the
    whole batch, never every modality; a row the draw would empty keeps what it has."""
    from models.heads.base import batch_keep_mask
    torch.manual_seed(0)
    present = torch.ones(32, 2, dtype=torch.bool)
    present[::4, 0] = False  # rows with no image
    draws = [batch_keep_mask(present, 0.5) for _ in range(400)]
    for keep in draws:
        complete = keep[present.all(1)]
        assert (complete == complete[0]).all() and keep.any(1).all() and not (keep & ~present).any()
    masked = np.array([(~d[1]).tolist() for d in draws]).mean(0)  # a complete row: masked 3/8 each
    assert np.allclose(masked, 0.375, atol=0.07)
    head = build_head(parse_head_config({"name": "mmp", "mask_per": "batch", "d_model": 8, "n_heads": 2}),
                      ModalitySpec(["a", "b"], {m: 4 for m in "ab"}, {m: 4 for m in "ab"}, {m: 3 for m in "ab"},
                                   n_classes=2)).train()
    out = head(FeatureBatch(torch.ones(8, 2, dtype=torch.bool), torch.zeros(8, dtype=torch.long),
                            tok={m: torch.randn(8, 3, 4) for m in "ab"},
                            tok_mask={m: torch.ones(8, 3, dtype=torch.bool) for m in "ab"}))
    assert torch.isfinite(out.logits).all()


def test_mmp_through_the_encoder_projects_embedding_layer_tokens_and_runs_them_through_the_lora_blocks(
        monkeypatch):
    """000 §III-B as written (``backbone="encoder+lora"``): a masked text's embedding-layer tokens are projected
    from the image's tokens (Eq. 2-5, in the embedding layer's space), aligned there to the real ones with
    Smooth L1 (Eq. 6), and the stream (frozen blocks + LoRA) runs over them; the image, which has no blocks,
    keeps the frozen output tokens. The frozen-output variant reads no embedding-layer token."""
    import models.heads.mmp as mmp_module
    from models.lora import LoRALinear
    spec = cmpt_spec()
    cfg = parse_head_config({"name": "mmp", "backbone": "encoder+lora", "d_model": 8, "n_heads": 2})
    assert cfg.label == "mmp-lora" and cfg.encoder_blocks == "optional"
    torch.manual_seed(0)
    head = build_head(cfg, spec, {"text": bert_blocks()})
    assert head.inputs == ("emb", "tok") and list(head.streams) == ["text"]
    assert head.variant["deviation"] == "lora+per_modality_encoders+frozen_output_tokens=image"
    assert all(m.dropout.p == 0.1 for m in head.modules() if isinstance(m, LoRALinear))  # CMPT's adapters
    assert not any(p.requires_grad for n, p in head.streams.named_parameters() if "lora_" not in n)
    frozen = build_head(parse_head_config({"name": "mmp", "d_model": 8, "n_heads": 2}), spec, {"text": bert_blocks()})
    assert frozen.inputs == ("tok",) and not frozen.streams and "deviation" not in frozen.variant

    seen, projected = [], {}
    head.streams["text"].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    real_project = head.project

    def spy(*args, **kwargs):
        projected.update(out := real_project(*args, **kwargs))
        return out
    head.project = spy
    # training: every row keeps its image and masks its text (a deterministic stand-in for the random draw)
    monkeypatch.setattr(mmp_module, "sample_keep_mask", lambda present, p: present & torch.tensor([True, False]))
    b = cmpt_batch(spec)
    out = head.train()(b)
    assert projected["text"].shape == b.emb["text"].shape  # in the embedding layer's space, its token count
    valid = b.emb_mask["text"].unsqueeze(-1)  # Eq. 6 over the real tokens of the masked text
    err = torch.nn.functional.smooth_l1_loss(projected["text"], b.emb["text"], reduction="none")
    assert torch.allclose(out.aux_loss, (err * valid).sum() / (valid.sum() * 32), atol=1e-6)
    assert torch.allclose(seen[-1], projected["text"].detach(), atol=1e-6)  # the blocks run over the projection
    out.aux_loss.backward()
    assert head.out["text"][-1].weight.grad.abs().sum() > 0
    # inference on a row without text: the blocks run over the projected tokens, the real text is not read
    head.eval()
    present = torch.tensor([[True, False]] + [[True, True]] * 5)
    b = cmpt_batch(spec, present=present)
    with torch.no_grad():
        logits = head(b).logits
        b.emb["text"][0] += 100
        b.tok["text"][0] += 100
        assert torch.allclose(head(b).logits, logits, atol=1e-5)
    assert torch.allclose(seen[-1][0], projected["text"][0], atol=1e-5) and torch.allclose(
        seen[-1][1:, :5], b.emb["text"][1:, :5])
    with pytest.raises(ValueError, match="no modality has encoder blocks"):
        build_head(cfg, spec, {})


# ------------------------------------------------------------------------------------------------ paper values
@pytest.mark.parametrize("tuned,names", [
    ("fashion_colour-cmpt", {"lam=0.847", "lr=0.00152", "weight_decay=0.00242", "schedule=cosine",
                             "warmup=1ep_linear", "batch_size=128", "epochs=20", "early_stop=7", "grad_clip=1"}),
    ("fashion-mmp", {"mask_p=0.646", "mask_per=sample", "align_weight=2.65"}),
    ("avmnist-srmm", {"hidden=256", "dropout=0.572", "embed_scale=16.5", "optimizer=adamw", "lr=0.000472",
                      "weight_decay=0.00507"}),
    ("fashion-early", set())])  # no paper states a baseline's values
def test_tuned_configs_name_every_value_that_differs_from_the_paper(tuned, names):
    from pathlib import Path
    from stores.config_files import load_config
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tuned" / f"{tuned}.yaml")
    assert set(deviations(cfg.head, cfg.train, cfg.eval, list(cfg.encoder_configs()))) == names


def test_the_default_recipe_is_named_against_001_a3_and_004_iv_b():
    from models.config import TrainConfig
    from models.paper import paper_head
    assert deviations(paper_head("cmpt"), TrainConfig()) == [
        "weight_decay=0.01", "schedule=cosine", "warmup=1.5ep_linear", "batch_size=128", "epochs=30",
        "early_stop=6", "grad_clip=1"]
    a3 = TrainConfig(weight_decay=0.02, schedule="poly", poly_power=0.9, warmup_frac=0.5, batch_size=8, epochs=10,
                     patience=10, grad_clip=0)
    assert deviations(paper_head("cmpt"), a3) == ["warmup=5ep_linear"]  # 001 warms up at a constant 0.1x
    assert deviations(paper_head("cmpt"), a3, modalities=["audio", "image"]) == [  # A3's audio-video column
        "lr=0.001", "warmup=5ep_linear", "batch_size=8", "epochs=10"]
    assert deviations(paper_head("srmm"), TrainConfig(lr=0.01, weight_decay=0)) == ["optimizer=adamw"]


@pytest.mark.parametrize("mods", [["image", "text"], ["audio", "image"]])
@pytest.mark.parametrize("name", ["cmpt", "late", "mmp", "srmm"])
def test_paper_constant_configs_have_no_head_deviation(name, mods):
    from models.paper import PAPER, paper_head
    head = paper_head(name, mods)
    assert deviations(head, modalities=mods) == [] and set(PAPER[name]["head"]) <= set(type(head).model_fields)
    assert all(c.source[:3] in ("000", "001", "004") for c in PAPER[name]["head"].values())
    if name == "srmm":
        assert head.hidden == (2048 if "audio" in mods else 768) and head.embed_scale == 1 and head.fusion == "prob"
        assert deviations(head.model_copy(update={"emb_dim": head.hidden}), modalities=mods) == []  # {in, L, L, C}
        assert deviations(head.model_copy(update={"emb_dim": 64}), modalities=mods) == ["emb_dim=64"]
    assert paper_head("early") is None and deviations(parse_head_config({"name": "moddrop", "p": 0.7})) == []


# ------------------------------------------------------------------------------------------------ patterns
MODS3 = ["image", "text", "audio"]


@pytest.mark.parametrize("rates,mods", [({"image": 0.8, "text": 0.5}, ["image", "text"]),
                                        ({"image": 0.9, "text": 0.9, "audio": 0.3}, MODS3),
                                        ({"image": 0.1}, ["image"])])
def test_impossible_per_modality_rates_are_an_error_before_training(rates, mods):
    p = MissingPattern(kind="per_modality", rates=rates)
    with pytest.raises(ValueError, match="is impossible: rates sum to"):
        p.check_modalities(mods)
    MissingPattern(kind="per_modality", rates=rates, allow_all_missing=True).check_modalities(mods)


@pytest.mark.parametrize("rates", [{"image": 0.9, "text": 0.9, "audio": 0.2}, {"image": 1.0, "text": 0.5, "audio": 0.5},
                                   {"image": 0.7, "text": 0.7, "audio": 0.6}, {"image": 0.5, "text": 0.5}])
@pytest.mark.parametrize("n", [1000, 7])
def test_feasible_per_modality_rates_are_met_exactly(rates, n):
    mods = MODS3 if "audio" in rates else ["image", "text"]
    p = MissingPattern(kind="per_modality", rates=rates)
    for seed in range(5):
        a = presence_mask(p, mods, n, "train", seed)
        assert a.any(1).all()
        got = (~a).sum(0).tolist()
        want = [round(rates[m] * n) for m in mods]
        assert got == want or (sum(want) > n * (len(mods) - 1) and sum(got) == n * (len(mods) - 1)
                               and all(abs(g - w) <= 1 for g, w in zip(got, want))), (got, want)


def test_per_modality_overlaps_stay_random():
    p = MissingPattern(kind="per_modality", rates={"image": 0.5, "text": 0.5, "audio": 0.5})
    a = presence_mask(p, MODS3, 2000, "train", 0)
    both = (~a[:, 0] & ~a[:, 1]).mean()
    assert 0.15 < both < 0.35  # not forced disjoint (0) nor nested (0.5)


def test_pattern_keys_and_slugs_are_exact():
    a, b = (MissingPattern(kind="per_modality", rates={"image": r}) for r in (0.333, 0.334))
    assert a.key != b.key and a.key == "per_modality[image=33.3]"
    assert scenario_slug(a, ["image", "text"]) == "image-033.3/text-000" != scenario_slug(b, ["image", "text"])
    assert not np.array_equal(presence_mask(a, ["image", "text"], 3000, "test", 0)[:, 0].sum(),
                              presence_mask(b, ["image", "text"], 3000, "test", 0)[:, 0].sum())
    assert MissingPattern(kind="per_modality", rates={"image": 0.3}).key == "per_modality[image=30]"  # unchanged
    assert MissingPattern(kind="map", eta=0.07).key == "map[both=7]"
    assert MissingPattern(kind="simultaneous", rate=0.1234).key != MissingPattern(kind="simultaneous", rate=0.1233).key


def test_noise_sigma_is_absolute_by_default_and_named_in_key_and_slug():
    from mlflow.utils.validation import validate_param_and_metric_name as ok
    absolute = MissingPattern(kind="noise", sigma=0.5)
    relative = MissingPattern(kind="noise", sigma=0.5, sigma_scale="feature_std")
    assert absolute.sigma_scale == "absolute" and absolute.key != relative.key
    slugs = {scenario_slug(p, MODS3) for p in (absolute, relative)}
    assert len(slugs) == 2 and all(ok(f"test/acc/{s}") for s in slugs)
    x = torch.randn(500, 64) * 100  # feature std 100
    batch = FeatureBatch(torch.ones(500, 1, dtype=torch.bool), torch.zeros(500), {"image": x})
    noisy = add_noise(batch, 0.5, np.random.default_rng(0), ["image"]).vec["image"] - x
    assert noisy.std().item() == pytest.approx(0.5, rel=0.05)  # Table IX: N(0, sigma)
    scaled = add_noise(batch, 0.5, np.random.default_rng(0), ["image"], sigma_scale="feature_std").vec["image"] - x
    assert scaled.std().item() == pytest.approx(50, rel=0.05)


# ------------------------------------------------------------------------------------------------ CMPT §3, A3
def cmpt_spec(mods=("image", "text"), width=32):
    return ModalitySpec(list(mods), {m: 8 for m in mods}, {m: 6 for m in mods}, {m: 5 for m in mods}, n_classes=3,
                        emb_dim={m: width for m in mods}, emb_len={m: 7 for m in mods})


def cmpt_batch(spec, n=6, present=None):
    g = torch.Generator().manual_seed(1)
    mods = spec.modalities
    emb_mask = torch.arange(7)[None] < torch.tensor([7, 3, 5, 7, 2, 6][:n])[:, None]
    return FeatureBatch(torch.ones(n, len(mods), dtype=torch.bool) if present is None else present,
                        torch.randint(0, 3, (n,), generator=g),
                        {m: torch.randn(n, 8, generator=g) for m in mods},
                        {m: torch.randn(n, 5, 6, generator=g) for m in mods},
                        {m: torch.ones(n, 5, dtype=torch.bool) for m in mods},
                        {m: torch.randn(n, 7, 32, generator=g) for m in mods}, {m: emb_mask for m in mods})


def bert_blocks():
    from transformers import BertConfig, BertModel
    from stores.encoders.hf import HFBlocks
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    return HFBlocks(bert.encoder.layer, 32)


def clip_text_blocks():
    from transformers import CLIPTextConfig, CLIPTextModel
    from stores.encoders.hf import BLOCK_FAMILIES, HFBlocks
    tm = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return HFBlocks(tm.encoder.layers, 32, tm.final_layer_norm, BLOCK_FAMILIES["clip_text_model"])


def whisper_blocks():
    from stores.encoders.hf import BlockFamily, HFBlocks
    b = bert_blocks()
    return HFBlocks(b.layers, 32, None, BlockFamily("whisper_encoder", cls_token="none"))


def cmpt(spec, backbones, **kw):
    torch.manual_seed(0)
    return build_head(parse_head_config({"name": "cmpt", **kw}), spec, backbones)


def test_cmpt_encoder_path_uses_the_encoders_own_class_token():
    spec = cmpt_spec()
    head = cmpt(spec, {"text": bert_blocks()}).eval()
    assert "text" not in head.cls_tok and not any(n.startswith("cls_tok.text") for n, _ in head.named_parameters())
    assert head.variant["text"] == "encoder+lora" and head.variant["image"] == "trainable_block+learned_cls"
    b = cmpt_batch(spec)
    with torch.no_grad():
        cls, proxies = head.run_stream("text", b)
        x, mask = b.emb["text"], b.emb_mask["text"]
        proxy = head.proxy_tok["text_to_image"].expand(6, 1, -1)
        h = head.streams["text"](torch.cat([x[:, :1], proxy, x[:, 1:]], 1),
                                 torch.cat([mask[:, :1], torch.ones(6, 1, dtype=torch.bool), mask[:, 1:]], 1))
    assert torch.allclose(cls, h[:, 0], atol=1e-6) and torch.allclose(proxies["image"], h[:, 1], atol=1e-6)


@pytest.mark.parametrize("blocks,variant", [(clip_text_blocks, "encoder+lora+eos_cls"),
                                            (whisper_blocks, "encoder+lora+meanpool_cls")])
def test_cmpt_families_without_a_class_token_use_a_named_choice(blocks, variant):
    spec = cmpt_spec()
    head = cmpt(spec, {"text": blocks()}).eval()
    assert head.variant["text"] == variant and "text" not in head.cls_tok
    b = cmpt_batch(spec)
    x, mask = b.emb["text"], b.emb_mask["text"]
    with torch.no_grad():
        cls, proxies = head.run_stream("text", b)
        h = head.streams["text"](torch.cat([x, head.proxy_tok["text_to_image"].expand(6, 1, -1)], 1),
                                 torch.cat([mask, torch.ones(6, 1, dtype=torch.bool)], 1))
    last = mask.sum(1) - 1
    want = h[torch.arange(6), last] if variant.endswith("eos_cls") else \
        (h[:, :7] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(cls, want, atol=1e-5) and torch.allclose(proxies["image"], h[:, 7], atol=1e-6)


def test_cmpt_alignment_is_eq4_on_output_tokens_without_stop_gradient():
    spec = cmpt_spec(("audio", "text"))
    head = cmpt(spec, {"audio": bert_blocks(), "text": bert_blocks()}).eval()  # equal widths: no maps at all
    assert not head.width_map and not head.fusion_proj and "deviation" not in head.variant
    seen, run = {}, head.run_stream

    def spy(m, batch):
        cls, proxies = run(m, batch)
        cls.retain_grad()
        seen[m] = (cls, proxies)
        return cls, proxies

    head.run_stream = spy
    present = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [1, 1]], dtype=torch.bool)
    out = head(cmpt_batch(spec, present=present))
    c = present.all(1)
    want = sum(torch.nn.functional.mse_loss(seen[j][1][i][c], seen[i][0][c]) for j, i in head.pairs)
    assert torch.allclose(out.aux_loss, 0.2 * want)
    out.aux_loss.backward()
    assert all(seen[m][0].grad.abs().sum() > 0 for m in spec.modalities)  # the CLS target is not detached


def test_cmpt_lora_dropout_in_training_only():
    from models.lora import LoRALinear
    head = cmpt(cmpt_spec(), {"text": bert_blocks()})
    loras = [m for m in head.modules() if isinstance(m, LoRALinear)]
    assert loras and all(isinstance(m.dropout, torch.nn.Dropout) and m.dropout.p == 0.1 for m in loras)
    lin = LoRALinear(torch.nn.Linear(16, 16), rank=1, dropout=0.1)
    with torch.no_grad():
        lin.lora_b.fill_(1.0)
    x = torch.randn(4, 16)
    lin.train()
    assert not torch.allclose(lin(x), lin(x))
    lin.eval()
    exact = lin.base(x) + (x @ lin.lora_a.T) @ lin.lora_b.T * lin.scale
    assert torch.allclose(lin(x), exact) and torch.allclose(lin(x), lin(x))


def test_cmpt_encoder_stream_skips_the_batchs_all_padding_tail_with_the_same_outputs():
    spec = cmpt_spec()
    head = cmpt(spec, {"text": bert_blocks()}).eval()
    b = cmpt_batch(spec, n=3)
    b.emb_mask["text"] = torch.arange(7)[None] < torch.tensor([3, 2, 4])[:, None]  # longest real: 4 of 7
    lengths = []
    hook = head.streams["text"].register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        cls, proxies = head.run_stream("text", b)
    hook.remove()
    assert lengths == [4 + 1]  # 4 real columns and the proxy token, not 7 + 1
    x, mask = b.emb["text"], b.emb_mask["text"]
    with torch.no_grad():
        h = head.streams["text"](torch.cat([x[:, :1], head.proxy_tok["text_to_image"].expand(3, 1, -1), x[:, 1:]], 1),
                                 torch.cat([mask[:, :1], torch.ones(3, 1, dtype=torch.bool), mask[:, 1:]], 1))
    assert torch.allclose(cls, h[:, 0], atol=1e-5) and torch.allclose(proxies["image"], h[:, 1], atol=1e-5)


def test_lora_oracle_is_cmpts_stream_alone_on_its_modality():
    spec = cmpt_spec()
    cfg = parse_head_config({"name": "oracle", "modality": "text", "backbone": "encoder+lora"})
    assert cfg.label == "oracle-text-lora" and cfg.encoder_blocks == "required"
    torch.manual_seed(0)
    head = build_head(cfg, spec, {"text": bert_blocks()}).eval()
    assert head.inputs == ("emb",) and head.variant == {"only": "text", "backbone": "encoder+lora"}
    from models.lora import LoRALinear
    loras = [m for m in head.modules() if isinstance(m, LoRALinear)]
    assert loras and all(m.dropout.p == 0.1 for m in loras)  # CMPT's adapters (001 A3)
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("net.") for n in trainable)
    b = cmpt_batch(spec)
    b.vec = {}  # it reads no pooled vector
    with torch.no_grad():
        logits = head(b).logits
        want = head.net(head.stream(b.emb["text"], b.emb_mask["text"])[:, 0])  # the encoder's own class token
    assert torch.allclose(logits, want, atol=1e-5)
    with pytest.raises(ValueError, match="no encoder blocks for 'image'"):
        build_head(parse_head_config({"name": "oracle", "modality": "image", "backbone": "encoder+lora"}), spec, {})


@pytest.mark.parametrize("name", ["early", "moddrop", "late"])
def test_lora_baseline_reads_cmpts_stream_where_a_modality_has_blocks_and_the_pooled_vector_elsewhere(name):
    spec = cmpt_spec()
    cfg = parse_head_config({"name": name, "backbone": "encoder+lora"})
    assert cfg.label == f"{name}-lora" and cfg.encoder_blocks == "optional"
    torch.manual_seed(0)
    head = build_head(cfg, spec, {"text": bert_blocks()}).eval()
    assert head.inputs == ("emb", "vec") and head.variant == {"backbone": "encoder+lora", "streams": "text"}
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert not any(n.startswith("streams.") and "lora_" not in n for n in trainable)  # the encoder stays frozen
    b = cmpt_batch(spec)
    b.emb.pop("image")  # the image reads its pooled vector, the text the stream's class token (no pooled vector)
    b.vec.pop("text")
    plain_spec = cmpt_spec()
    plain_spec.vec_dim["text"] = 32  # the pooled head over the stream's width
    plain = build_head(parse_head_config({"name": name}), plain_spec).eval()
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("streams.")})
    with torch.no_grad():
        logits = head(b).logits
        b.vec["text"] = head.streams["text"](b.emb["text"], b.emb_mask["text"])[:, 0]  # the encoder's class token
        assert torch.allclose(logits, plain(b).logits, atol=1e-5)  # = the pooled head on the stream's CLS
        b.emb["text"] = b.emb["text"] + 1
        assert not torch.allclose(logits, head(b).logits, atol=1e-3)
        gone = cmpt_batch(spec, present=torch.tensor([[True, False]] * 6))  # missing text: zero-filled
        gone.vec["text"] = torch.zeros(6, 32)
        assert torch.allclose(head(gone).logits, plain(gone).logits, atol=1e-5)
    with pytest.raises(ValueError, match="no modality has encoder blocks"):
        build_head(cfg, spec, {})
    with pytest.raises(ValueError, match="fills with zeros only"):
        build_head(parse_head_config({"name": name, "backbone": "encoder+lora", "fill": "placeholder"}), spec,
                   {"text": bert_blocks()})
