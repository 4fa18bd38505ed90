"""Dataset adapters: the real shared datasets and tiny fixtures in the Food-101 / MM-IMDb release layouts."""
import json
from collections import Counter

import pytest
from PIL import Image

from conftest import DATASETS
from models.config import DataConfig
from stores.datasets import DatasetError, load_dataset


def test_avmnist_holds_out_speakers_and_pairs_by_label():
    if not (DATASETS / "fsdd").exists():
        pytest.skip("shared datasets not available")
    ds = load_dataset(DataConfig(dataset="avmnist", data_dir=DATASETS))
    assert len(ds.records) == 3000 and ds.modalities == ["image", "audio"]
    test_speakers = {r.id.split("_")[1] for r in ds.records if r.split == "test"}
    train_speakers = {r.id.split("_")[1] for r in ds.records if r.split != "test"}
    assert test_speakers == {"theo", "yweweler"} and not test_speakers & train_speakers
    assert all(int(r.id.split("_")[0]) == r.label for r in ds.records)  # clip digit == label
    images = [r.payload["image"] for r in ds.records]
    assert len(set(images)) == len(images)  # each MNIST image used once
    with pytest.raises(DatasetError, match="test_speakers"):
        load_dataset(DataConfig(dataset="avmnist", data_dir=DATASETS, test_speakers=["nobody"]))


def test_fashion_classes_and_stratified_splits():
    if not (DATASETS / "fashion").exists():
        pytest.skip("shared datasets not available")
    ds = load_dataset(DataConfig(dataset="fashion", data_dir=DATASETS))
    assert len(ds.records) == 2886 and len(ds.classes) == 24
    assert Counter(r.split for r in ds.records)["test"] == 575
    master = load_dataset(DataConfig(dataset="fashion", data_dir=DATASETS, label_field="masterCategory"))
    assert len(master.classes) < 24
    with pytest.raises(DatasetError, match="label_field"):
        load_dataset(DataConfig(dataset="fashion", data_dir=DATASETS, label_field="nope"))


def test_food101_release_layout(tmp_path):
    for split in ("train", "test"):
        rows = []
        for cls in ("pizza", "sushi"):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(10 if split == "train" else 3):
                name = f"{cls}_{split}_{i}.jpg"
                Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / cls / name)
                rows.append(f"{name},a photo of {cls} number {i},{cls}")
        (tmp_path / "texts").mkdir(exist_ok=True)
        (tmp_path / "texts" / f"{split}_titles.csv").write_text("\n".join(rows))
    ds = load_dataset(DataConfig(dataset="food101", data_dir=tmp_path))
    assert ds.classes == ["pizza", "sushi"] and len(ds.records) == 26
    splits = Counter(r.split for r in ds.records)
    assert splits == {"train": 18, "val": 2, "test": 6}
    r = next(r for r in ds.records if r.split == "test")
    assert r.payload["text"].startswith("a photo of") and (tmp_path / "images").as_posix() in r.payload["image"]


def test_mmimdb_release_layout_is_multilabel(tmp_path):
    (tmp_path / "dataset").mkdir()
    genres = [["Drama"], ["Comedy", "Drama"], ["Horror"], ["Comedy"]]
    for i, g in enumerate(genres):
        Image.new("RGB", (8, 8)).save(tmp_path / "dataset" / f"{i}.jpeg")
        (tmp_path / "dataset" / f"{i}.json").write_text(json.dumps({"plot": [f"plot {i}"], "genres": g}))
    (tmp_path / "split.json").write_text(json.dumps({"train": ["0", "1"], "dev": ["2"], "test": ["3"]}))
    ds = load_dataset(DataConfig(dataset="mmimdb", data_dir=tmp_path))
    assert ds.task == "multilabel" and ds.classes == ["Comedy", "Drama", "Horror"]
    by_id = {r.id: r for r in ds.records}
    assert by_id["1"].label == [0, 1] and by_id["2"].split == "val" and by_id["3"].payload["text"] == "plot 3"


def test_manifest_errors_name_the_problem(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("id,split,label,text\n1,training,a,hello\n")
    with pytest.raises(DatasetError, match="row 0 \\(id=1\\): split 'training'"):
        load_dataset(DataConfig(dataset="manifest", manifest=bad))
    (tmp_path / "cols.csv").write_text("id,label\n1,a\n")
    with pytest.raises(DatasetError, match="lacks columns \\['split'\\]"):
        load_dataset(DataConfig(dataset="manifest", manifest=tmp_path / "cols.csv"))
    with pytest.raises(DatasetError, match="needs data.manifest"):
        load_dataset(DataConfig(dataset="manifest"))


def test_manifest_label_set_is_enforced(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "split": "train", "label": "cat", "text": "x"}\n'
                 '{"id": "b", "split": "test", "label": "dgo", "text": "y"}\n')
    with pytest.raises(DatasetError, match="row 1 \\(id=b\\): label 'dgo' is not in data.classes \\['cat', 'dog'\\]"):
        load_dataset(DataConfig(dataset="manifest", manifest=m, classes=["cat", "dog"]))
    m.write_text('{"id": "a", "split": "train", "label": "dog", "text": "x"}\n'
                 '{"id": "b", "split": "test", "label": "", "text": "y"}\n')
    with pytest.raises(DatasetError, match="row 1 \\(id=b\\): empty label"):
        load_dataset(DataConfig(dataset="manifest", manifest=m, classes=["cat", "dog"]))
    m.write_text('{"id": "a", "split": "train", "label": "dog", "text": "x"}\n')
    ds = load_dataset(DataConfig(dataset="manifest", manifest=m, classes=["cat", "dog"]))
    assert ds.classes == ["cat", "dog"] and ds.records[0].label == 1  # fixed indices, even for unseen classes


def test_manifest_encoding_and_json_errors_name_the_line(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes(b"id,split,label,text\n1,train,a,caf\xe9 au lait\n")  # Latin-1, not UTF-8
    with pytest.raises(DatasetError, match="line 2 is not UTF-8"):
        load_dataset(DataConfig(dataset="manifest", manifest=m))
    j = tmp_path / "m.jsonl"
    j.write_text('{"id": "a", "split": "train", "label": "x", "text": "ok"}\n{"id": "b", "split": \n')
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        load_dataset(DataConfig(dataset="manifest", manifest=j))
