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
    from stores.extraction.ray import encode_items

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


# --------------------------------------------------------------- store.extract_engine: ray, the whole extraction
def _store_state(cfg) -> dict:
    """Everything extraction wrote: the search table by id and each view by content key (duplicates counted)."""
    from stores.features.feature_store import FeatureStore, store_name

    store = FeatureStore(cfg.store.root, store_name(cfg))
    tbl = store.table
    rows = {r["id"]: r for r in tbl.search().limit(10_000).to_arrow().to_pylist()}
    assert len(rows) == tbl.count_rows()  # no duplicate ids
    views = {}
    for m, view in store.views().items():
        t = view.table().search().select(["key", "present", "reason", "vec", "ntok", "nemb"]).limit(10_000)
        rows_m = t.to_arrow().to_pylist()
        views[m] = {r["key"]: r for r in rows_m}
        assert len(views[m]) == len(rows_m)  # each content key once
    return {"search": rows, "views": views}


def _assert_same_store(got: dict, ref: dict) -> None:
    assert sorted(got["search"]) == sorted(ref["search"])
    for i, r in ref["search"].items():
        g = got["search"][i]
        for col, v in r.items():
            if col.endswith("_vec"):
                np.testing.assert_allclose(g[col], v, rtol=1e-3, atol=1e-4, err_msg=f"{i} {col}")
            else:
                assert g[col] == v, (i, col)
    assert got["views"].keys() == ref["views"].keys()
    for m, rows in ref["views"].items():
        assert got["views"][m].keys() == rows.keys()
        for k, r in rows.items():
            g = got["views"][m][k]
            assert (g["present"], g["reason"], g["ntok"], g["nemb"]) == (r["present"], r["reason"], r["ntok"],
                                                                          r["nemb"]), (m, k)
            np.testing.assert_allclose(g["vec"], r["vec"], rtol=1e-3, atol=1e-4, err_msg=f"{m} {k}")


@pytest.fixture(scope="module")
def engine_manifest(tmp_path_factory):
    """The tiny colour manifest (bad inputs included) and its store extracted by the local engine. Image batches
    of 2 and commits of 8 rows give the Ray job many batches and the extraction several commits."""
    from stores.extraction import extract

    tmp = tmp_path_factory.mktemp("engine")
    manifest = make_manifest(tmp / "raw")
    cfg = manifest_config(tmp / "local", manifest, encoders__image__batch_size=2)
    extract(cfg, progress=False)
    return manifest, _store_state(cfg)


def test_ray_engine_extraction_equals_the_local_engine(ray_cluster, engine_manifest, tmp_path):
    from stores.extraction import extract

    manifest, ref = engine_manifest
    cfg = manifest_config(tmp_path, manifest, encoders__image__batch_size=2, store__extract_engine="ray")
    report = extract(cfg, progress=False)
    assert report.rows == report.added == 36 and report.encoded == {"image": 35, "text": 4}
    assert report.encode_items_per_s.keys() == {"image", "text"}  # the workers' decode + encode time
    assert report.missing_counts == {"image": {"absent in source": 1, "unreadable image": 2}, "text": {"empty text": 1}}
    _assert_same_store(_store_state(cfg), ref)
    again = extract(cfg, progress=False)  # nothing new: no cluster work, nothing written
    assert again.added == 0 and again.encoded == {"image": 0, "text": 0}


def test_ray_engine_survives_an_encoder_actor_killed_mid_extraction(ray_cluster, engine_manifest, tmp_path,
                                                                   monkeypatch):
    """SIGKILL the encoder actor's process right after the first commit: Ray restarts it and retries its
    batches; the extraction completes with the local engine's store, no row lost or duplicated."""
    import os
    import signal

    from ray._private.state import actors  # the public state API needs the dashboard, off on this cluster

    from stores.extraction import extract
    from stores.features.feature_store import FeatureStore

    manifest, ref = engine_manifest
    cfg = manifest_config(tmp_path, manifest, encoders__image__batch_size=2, store__extract_engine="ray")
    killed: dict = {}
    commit = FeatureStore.upsert_search

    def commit_then_kill(self, rows, vec_dim, new):
        commit(self, rows, vec_dim, new)
        if not killed:
            alive = [a for a in actors().values() if "EncodeActor" in a["ActorClassName"] and a["State"] == "ALIVE"]
            assert len(alive) == 1
            killed.update(id=alive[0]["ActorID"], pid=alive[0]["Pid"], committed=self.table.count_rows())
            os.kill(killed["pid"], signal.SIGKILL)

    monkeypatch.setattr(FeatureStore, "upsert_search", commit_then_kill)
    report = extract(cfg, progress=False)
    assert 0 < killed["committed"] < 36  # killed mid-extraction
    assert actors()[killed["id"]]["NumRestarts"] >= 1  # the killed actor was restarted and finished the work
    assert report.rows == report.added == 36
    _assert_same_store(_store_state(cfg), ref)
