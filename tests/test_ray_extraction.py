"""Ray Data encoding on a real local Ray cluster matches the single-process encoders: same keys in input order,
equal features (float16 token tolerance), and the same reasons for unusable inputs."""
import numpy as np
import pytest

from conftest import make_manifest, manifest_config


# image: tensors, a truncated JPEG, a corrupt file, an absent input; text: the Hugging Face path (embedding-layer
# tokens too) and an empty text. Audio takes the same path; left out to keep CI time (one actor start each)
@pytest.mark.parametrize("modality", ["image", "text"])
def test_ray_data_encoding_matches_the_encoder(ray_cluster, tmp_path_factory, modality):
    from stores.datasets import load_dataset
    from stores.encoders import BadInput, build_encoder
    from stores.ray_extraction import encode_items

    tmp = tmp_path_factory.mktemp("raydata")
    cfg = manifest_config(tmp, make_manifest(tmp / "raw", n=12, audio=True), modalities=("image", "text", "audio"))
    ds = load_dataset(cfg.data)
    refs = [(r.id, ds.raw(modality, r.payload.get(modality))) for r in ds.records]
    enc_cfg = cfg.encoder_configs()[modality].model_copy(update={"device": "cpu"})
    got = list(encode_items(enc_cfg, modality, refs, batch_size=4))

    encoder = build_encoder(modality, enc_cfg)
    expected = {}
    for key, ref in refs:
        try:
            if ref is None:
                raise BadInput("absent in source")
            f = encoder.encode([encoder.load(ref)])
            expected[key] = {"vec": f.vec[0], "tok": f.tok[0], "emb": f.emb[0] if f.emb is not None else None}
        except BadInput as e:
            expected[key] = str(e)
    assert [k for k, _ in got] == [k for k, _ in refs]
    reasons = {k: v for k, v in got if isinstance(v, str)}
    assert reasons == {k: v for k, v in expected.items() if isinstance(v, str)}
    assert len(reasons) == {"image": 3, "text": 1}[modality]  # the manifest's bad inputs
    for key, feats in got:
        if isinstance(feats, str):
            continue
        exp = expected[key]
        np.testing.assert_allclose(feats["vec"], exp["vec"], rtol=1e-3, atol=1e-4)
        assert feats["tok"].dtype == np.float16 and feats["tok"].shape == exp["tok"].shape
        np.testing.assert_allclose(feats["tok"].astype(np.float32), exp["tok"].astype(np.float32), rtol=1e-2, atol=1e-2)
        assert (feats["emb"] is None) == (exp["emb"] is None) == (modality == "image")
        if feats["emb"] is not None:
            np.testing.assert_allclose(feats["emb"].astype(np.float32), exp["emb"].astype(np.float32), rtol=1e-2,
                                       atol=1e-2)
