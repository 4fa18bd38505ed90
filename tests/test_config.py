from pathlib import Path

import pytest
import yaml

from models.config import ConfigError, ExperimentConfig
from stores.config_files import load_config


def test_yaml_extends_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  dataset: fashion\ntrain:\n  epochs: 7\n")
    (tmp_path / "exp.yaml").write_text("extends: base.yaml\nhead:\n  name: srmm\n  strategy: S-1\n")
    cfg = load_config(tmp_path / "exp.yaml", ["train.lr=0.01", "sweep.seeds=[4,5]"])
    assert cfg.data.dataset == "fashion" and cfg.train.epochs == 7 and cfg.train.lr == 0.01
    assert cfg.head.name == "srmm" and cfg.head.strategy == "S-1"
    assert cfg.sweep.seeds == [4, 5]


@pytest.mark.parametrize("override, needle", [
    (["train.epoch=3"], "train.epoch"),                    # typo in a key
    (["head.name=nope"], "unknown head 'nope'"),
    (["head.name=mmp", "head.n_agg=x"], "n_agg"),
    (["train_pattern.kind=per_modality", "train_pattern.rates={image: 1.5}"], "must lie in [0, 1]"),
    (["train_pattern.kind=absent"], "needs `modality`"),
    (["sweep.heads=[{name: mmp, d_modle: 3}]"], "d_modle"),
])
def test_bad_config_gets_clear_error(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.epochs"])


def test_flat_params_cover_the_whole_tree():
    cfg = ExperimentConfig()
    flat = cfg.flat()
    assert flat["head.name"] == "mmp" and flat["head.n_agg"] == "8" and flat["train.epochs"] == "30"
    assert flat["data.dataset"] == "avmnist" and "tracking.uri" in flat and "eval.test_rates" in flat
    # round-trips through JSON (what Prefect parameters and MLflow artifacts carry)
    assert ExperimentConfig.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("head,field,value", [("mmp", "dropout", 1.5), ("mmp", "mask_p", -0.1), ("cmpt", "lora_rank", 0),
                                              ("srmm", "embed_scale", 0), ("moddrop", "p", 2), ("oracle", "hidden", 0)])
def test_head_config_ranges_are_checked_at_load(head, field, value):
    with pytest.raises(ConfigError, match=rf"head\.{field}"):
        load_config(None, [f"head.name={head}", f"head.{field}={value}"])


def test_two_oracles_get_their_own_registered_names_and_columns():
    from flows.console import short_head
    labels = {load_config(None, ["head.name=oracle", f"head.modality={m}"]).head.label for m in ("image", "audio")}
    assert labels == {"oracle-image", "oracle-audio"} and load_config(None, ["head.name=mmp"]).head.label == "mmp"
    assert short_head("oracle[only:audio]") == "oracle\naudio" and short_head("mmp[tokens:x]") == "mmp"
    assert short_head("oracle[only:text,backbone:encoder+lora]") == "oracle\ntext-lora"  # head label oracle-text-lora
    assert short_head("moddrop[backbone:encoder+lora,streams:text]") == "moddrop-lora" != short_head("moddrop")
    assert short_head("cmpt[text:encoder+lora,image:trainable_block+learned_cls]") == "cmpt"


def test_store_root_uri_stays_a_uri_and_credentials_stay_out_of_the_config():
    from pathlib import Path
    cfg = load_config(None, ["store.root=s3://bucket/features", "store.storage_options.aws_endpoint=http://h:9"])
    assert cfg.store.root == "s3://bucket/features"  # not Path's "s3:/bucket/features"
    assert isinstance(load_config(None, ["store.root=data/x"]).store.root, Path)
    with pytest.raises(ConfigError, match="look like credentials: set them in the environment") as e:
        load_config(None, ["store.storage_options.aws_secret_access_key=hunter2"])
    assert "hunter2" not in str(e.value)


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads_and_a_tuned_file_names_its_head_and_marks_its_runs(path):
    cfg = load_config(path)  # extra="forbid" and the ranges: a typo in a shipped file fails here
    if path.parent.name == "tuned":  # configs/tuned/<source config>-<head>.yaml extends ../<source config>.yaml
        source = yaml.safe_load(path.read_text())["extends"]
        assert path.stem == f"{Path(source).stem}-{cfg.head.name}"
        assert cfg.tune.applied == path.stem  # its runs are named ...-tuned in MLflow


def test_store_and_view_names_are_those_the_code_before_the_layout_change_gave():
    """A store written before the package layout changed (8d73ba0) opens without re-extraction: the runtime fields
    derived from the schema's RUNTIME marks leave out what the three hand-written lists left out, so every store,
    legacy-layout and view name is the same (tests/fixtures/names_8d73ba0.json, computed by that code)."""
    import json
    from stores.features.feature_store import legacy_store_name, store_name
    from stores.features.views import view_name
    root = Path(__file__).resolve().parents[1]
    for source, want in json.loads((root / "tests" / "fixtures" / "names_8d73ba0.json").read_text()).items():
        cfg = load_config(root / source) if source != "manifest" else load_config(None, [
            "data.dataset=manifest", "data.manifest=items.csv", "encoders.image.kind=hf", "encoders.image.model=/m/vit",
            "encoders.image.batch_size=7", "encoders.image.device=cpu", "encoders.image.precision=float32",
            "encoders.text.max_length=32"])
        assert {"store": store_name(cfg), "legacy": legacy_store_name(cfg),
                "views": {m: view_name(m, e) for m, e in sorted(cfg.encoder_configs().items())}} == want, source


def test_runtime_fields_come_from_one_mark_and_change_no_name():
    from models.config import EncoderConfig, runtime_fields
    from stores.features.views import view_name
    assert runtime_fields(EncoderConfig) == {"batch_size": True, "device": True, "precision": True,
                                             "max_image_pixels": True}
    tree = runtime_fields(ExperimentConfig)
    assert tree["encoders"] == {"__all__": runtime_fields(EncoderConfig)} and tree["tracking"] is True
    assert tree["data"] == {"data_dir": True, "allowed_roots": True}
    assert "versions" not in tree["store"] and "root" in tree["store"]
    base = EncoderConfig(kind="minilm")
    assert view_name("text", base) == view_name("text", base.model_copy(update={"batch_size": 3, "precision": "bfloat16"}))
    assert view_name("text", base) != view_name("text", base.model_copy(update={"max_length": 32}))


def test_one_device_resolver_refuses_cuda_without_cuda():
    import torch
    from stores.encoders import build_encoder
    from models.config import EncoderConfig
    from models.device import resolve_device
    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="encoders.image.device='cuda' but CUDA is not available"):
        build_encoder("image", EncoderConfig(kind="efficientnet_lite0", device="cuda"))
    with pytest.raises(ConfigError, match="train.device='cuda'"):
        resolve_device("cuda", "train.device")


@pytest.mark.parametrize("argv, says", [
    (["train", "-c", "configs/fashion.yaml", "--set", "train.epochs=-1"], "greater than or equal to 1"),
    (["extract", "-c", "configs/fashion.yaml", "--set", "encoders.text.model=/nonexistent/model"],
     "encoders.text.model: /nonexistent/model does not exist"),
])
def test_a_rejected_value_is_refused_before_torch_or_any_service_is_imported(argv, says):
    """``mm train`` with a bad value, ``mm extract`` with an encoder path that does not exist, answer from the
    config's own import (pydantic, numpy): no torch, Prefect, MLflow or LanceDB, so a rejection takes about a
    second, not the 4-25 s of those imports (the missing path took 17 s: it was found once the flow ran)."""
    import subprocess
    import sys
    probe = (f"import sys\nfrom flows.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
             "    code = e.code\n"
             "heavy = sorted(m for m in ('torch', 'prefect', 'mlflow', 'lancedb', 'transformers') if m in sys.modules)\n"
             "print('RESULT', code, ','.join(heavy) or '-')\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert says in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout.split()[-2:] == ["2", "-"], done.stdout
