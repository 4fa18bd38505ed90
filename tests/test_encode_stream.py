"""Decode-ahead encoding (stores/encoders/stream.py) and the uint8 image path: same features as decoding and
scaling on the host one batch at a time, input order kept, bad inputs reported per item."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import EncoderConfig
from stores.encoders.stream import ABSENT_REASON, encode_stream
from stores.encoders import build_encoder
from stores.encoders.base import load_image

from conftest import make_manifest


@pytest.fixture(scope="module")
def image_refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    make_manifest(root, n=14)  # img0 truncated, img1 not an image
    return [str(root / f"img{i}.jpg") for i in range(14)]


def test_uint8_path_gives_the_float_path_features_exactly(image_refs):
    enc = build_encoder("image", EncoderConfig(kind="efficientnet_lite0", device="cpu"))
    good = image_refs[2:10]
    x = torch.stack([load_image(r, 224) for r in good])  # the former float32 host path
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
