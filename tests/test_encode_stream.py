"""Decode-ahead encoding (stores/encoders/stream.py) and the uint8 image path: same features as decoding and
scaling on the host one batch at a time, input order kept, bad inputs reported per item."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from models.config import EncoderConfig
from stores.encoders.stream import ABSENT_REASON, decode_workers, encode_stream
from stores.encoders import build_encoder
from stores.encoders.base import LOAD_WORKERS, Encoded, Encoder, load_image_uint8, masked_mean

from conftest import make_manifest


def float_image(ref, size: int) -> torch.Tensor:
    """The former host path both encoders had: [3, size, size] float in [0, 1]."""
    return load_image_uint8(ref, size).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def image_refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    make_manifest(root, n=14)  # img0 truncated, img1 not an image
    return [str(root / f"img{i}.jpg") for i in range(14)]


def test_uint8_path_gives_the_float_path_features_exactly(image_refs):
    enc = build_encoder("image", EncoderConfig(kind="efficientnet_lite0", device="cpu"))
    good = image_refs[2:10]
    x = torch.stack([float_image(r, 224) for r in good])  # the former float32 host path
    with torch.inference_mode():
        fmap = torch.cat([enc.net.forward_features(c) for c in
                          ((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last).split(4)])
    new = enc.encode([enc.load(r) for r in good])
    assert enc.load(good[0]).dtype == torch.uint8
    np.testing.assert_array_equal(new.vec, fmap.flatten(2).mean(2).numpy())


def test_stream_keeps_order_and_reasons(image_refs):
    enc = build_encoder("image", EncoderConfig(kind="efficientnet_lite0", device="cpu"))
    refs = image_refs + [None]
    out = list(encode_stream(enc, refs, batch_size=4, workers=2, prefetch=1))
    assert len(out) == len(refs)
    reasons = [r for _, r in out]
    assert reasons[0].startswith("unreadable image") and reasons[1].startswith("unreadable image")
    assert reasons[-1] == ABSENT_REASON and all(r is None for r in reasons[2:-1])
    direct = enc.encode([enc.load(r) for r in image_refs[2:]])
    got = np.stack([f["vec"] for f, _ in out[2:-1]])
    np.testing.assert_allclose(got, direct.vec, rtol=0, atol=1e-5)
    assert out[0][0] is None and out[2][0]["tok"].shape == (49, 1280)


@pytest.mark.parametrize("size", [32, 48])  # 48: the processor resizes to the model's 32
def test_hf_image_uint8_path_gives_the_float_path_features_exactly(tiny_hf, image_refs, size):
    enc = build_encoder("image", EncoderConfig(kind="hf", model=str(tiny_hf["image"]), image_size=size))
    good = image_refs[2:10]
    assert enc.load(good[0]).dtype == torch.uint8 and enc.load(good[0]).shape == (size, size, 3)
    old = enc.proc(images=[float_image(r, size).permute(1, 2, 0).numpy() for r in good], return_tensors="pt",
                   do_rescale=False)  # the former path: [0, 1] floats
    with torch.inference_mode():
        hidden = enc.model(**old, output_hidden_states=True).last_hidden_state
    new = enc.encode([enc.load(r) for r in good])
    np.testing.assert_array_equal(new.vec, masked_mean(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool)).numpy())


class ThreadRecordingEncoder(Encoder):
    """Decodes a number into a list and records the decoding thread (the thread use is what is tested)."""
    modality, id, revision, preprocessing = "text", "recorder", "0", {}

    def __init__(self, device: str):
        self.device, self.threads = torch.device(device), set()

    def load(self, ref):
        self.threads.add(threading.get_ident())
        if ref == "bad":
            raise ValueError("no number")
        return float(ref)

    def encode(self, items):
        x = np.asarray(items, np.float32)[:, None]
        return Encoded(x, [row[None] for row in x], None)


def test_a_cpu_encoder_decodes_inline_and_an_accelerator_one_ahead_on_threads():
    refs = ["1", "bad", None, *map(str, range(2, 40))]
    cpu = ThreadRecordingEncoder("cpu")
    def seen(stream):
        return [f["vec"][0] if f else r.split(":")[0] for f, r in stream]

    out = seen(encode_stream(cpu, refs, batch_size=8))
    assert cpu.threads == {threading.get_ident()}
    assert out == [1.0, "undecodable", ABSENT_REASON, *map(float, range(2, 40))]
    ahead = ThreadRecordingEncoder("cpu")
    assert seen(encode_stream(ahead, refs, batch_size=8, workers=2)) == out  # what a CUDA encoder gets
    assert threading.get_ident() not in ahead.threads and len(ahead.threads) >= 1
    assert decode_workers(ThreadRecordingEncoder("meta")) == LOAD_WORKERS and decode_workers(cpu) == 0
