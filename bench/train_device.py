"""Training on a GPU worker (CUDA, bf16 autocast) vs CPU, side by side in one run: seconds per epoch of each
head, and for the vector heads the test accuracy on real Fashion features on both devices (they must agree).

    python bench/train_device.py --export bench/results/fashion-vec.pt    # here: real pooled features
    python bench/train_device.py --features bench/results/fashion-vec.pt [--text-model PATH] [--epochs 8]

Only ``models/`` (torch + pydantic) runs here, so a GPU machine without LanceDB can run it. Token heads
(MMP, CMPT) are timed on random features of Fashion's real shapes (49x1280 image tokens, MiniLM text
tokens), since their token cache does not travel; the CMPT faithful path runs MiniLM's real blocks with LoRA
when ``--text-model`` (or the installed package) is there.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.features import apply_presence
from models.heads import FeatureBatch, ModalitySpec, build_head, parse_head_config
from models.metrics import classification_metrics
from models.patterns import MissingPattern, presence_mask
from models.training import TrainConfig, fit, predict


def export(path: Path) -> None:
    from stores.config_files import load_config
    from stores.features.feature_store import open_store

    store = open_store(load_config("configs/fashion.yaml"))
    spec = store.spec()
    out = {"spec": {k: getattr(spec, k) for k in ("modalities", "vec_dim", "tok_dim", "tok_len", "n_classes",
                                                  "task", "emb_dim", "emb_len")},
           "placeholder": {m: v[0].half() for m, v in store.placeholders(("vec",)).vec.items()}}
    for split in ("train", "val", "test"):
        b = store.read_split(split, ("vec",)).batch
        out[split] = {"present": b.present.clone(), "y": b.y.clone(), "vec": {m: v.half().clone() for m, v in b.vec.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def load(path: Path) -> tuple[ModalitySpec, dict[str, FeatureBatch], FeatureBatch]:
    raw = torch.load(path, weights_only=False)
    ph = {m: v.float() for m, v in raw["placeholder"].items()}
    spec = ModalitySpec(**raw["spec"], placeholder_vec=ph)
    splits = {s: FeatureBatch(d["present"], d["y"], {m: v.float() for m, v in d["vec"].items()})
              for s, d in raw.items() if s in ("train", "val", "test")}
    return spec, splits, FeatureBatch(torch.zeros(1, len(ph), dtype=torch.bool), torch.zeros(1, dtype=torch.long),
                                      {m: v[None] for m, v in ph.items()})


def synthetic(spec: ModalitySpec, n: int, seed: int = 0) -> FeatureBatch:
    """Random features of the store's real shapes, every modality present, tokens, embeddings and masks."""
    g = torch.Generator().manual_seed(seed)
    b = FeatureBatch(torch.ones(n, len(spec.modalities), dtype=torch.bool),
                     torch.randint(0, spec.n_classes, (n,), generator=g))
    for m in spec.modalities:
        b.vec[m] = torch.randn(n, spec.vec_dim[m], generator=g)
        b.tok[m] = torch.randn(n, spec.tok_len[m], spec.tok_dim[m], generator=g).half()
        b.tok_mask[m] = torch.ones(n, spec.tok_len[m], dtype=torch.bool)
        if m in spec.emb_dim:
            b.emb[m] = torch.randn(n, spec.emb_len[m], spec.emb_dim[m], generator=g).half()
            b.emb_mask[m] = torch.ones(n, spec.emb_len[m], dtype=torch.bool)
    return b


def backbones_for(head: str, text_model: str | None) -> dict:
    if head != "cmpt[encoder+lora]":
        return {}
    from models.config import EncoderConfig
    from stores.encoders import build_encoder

    return {"text": build_encoder("text", EncoderConfig(kind="minilm", model=text_model, device="cpu")).blocks()}


def time_epoch(name: str, spec: ModalitySpec, data: FeatureBatch, device: str, text_model: str | None,
               deterministic: bool = True) -> float:
    cfg = {"cmpt[encoder+lora]": {"name": "cmpt", "backbone": "auto"},
           "cmpt[trainable_block]": {"name": "cmpt", "backbone": "trainable_block"}}.get(name, {"name": name})
    head = build_head(parse_head_config(cfg), spec, backbones_for(name, text_model))
    res = fit(head, data, data, TrainConfig(epochs=2, device=device, patience=99, deterministic=deterministic),
              seed=0)
    return res.seconds / 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", type=Path)
    ap.add_argument("--features", type=Path, default=Path("bench/results/fashion-vec.pt"))
    ap.add_argument("--text-model", default=None)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--token-rows", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    if args.export:
        return export(args.export)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    where = f"CPU ({torch.get_num_threads()} threads)"
    if "cuda" in devices:
        where += f" vs {torch.cuda.get_device_name()} (bf16 autocast)"
    spec, splits, ph = load(args.features)
    mods = spec.modalities
    if "cuda" in devices:  # CUDA context, cuBLAS/cuDNN handles and kernels load outside the timings
        time_epoch("mmp", spec, synthetic(spec, 256), "cuda", None)
    lines = [f"### Training on each device: {where}\n",
             f"Vector heads on real Fashion features ({splits['train'].size} train rows, {args.epochs} epochs); "
             "test accuracy (%) complete and with image 100% missing.\n",
             "| head | device | s/epoch | acc complete | acc image missing | GPU speed-up |", "|---|---|---|---|---|---|"]
    absent = MissingPattern(kind="absent", modality="image")
    test_missing = apply_presence(splits["test"], torch.from_numpy(
        presence_mask(absent, mods, splits["test"].size, "test", 0)), ph, mods)
    for name in ("early", "late", "moddrop", "srmm"):
        per_dev = {}
        for dev in devices:
            head = build_head(parse_head_config({"name": name}), spec)
            cfg = TrainConfig(epochs=args.epochs, device=dev, patience=99)
            res = fit(head, splits["train"], splits["val"], cfg, seed=0)
            acc = [100 * classification_metrics(predict(head, b, cfg), b.y)["acc"]
                   for b in (splits["test"], test_missing)]
            per_dev[dev] = res.seconds / res.epochs_run
            ratio = f"{per_dev['cpu'] / per_dev[dev]:.1f}x" if dev == "cuda" else "-"
            lines.append(f"| {name} | {dev} | {per_dev[dev]:.2f} | {acc[0]:.1f} | {acc[1]:.1f} | {ratio} |")
            print(lines[-1], flush=True)
    data = synthetic(spec, args.token_rows)
    lines += ["", f"Token heads, {args.token_rows} rows of random features with Fashion's real token shapes "
              f"({', '.join(f'{m} {spec.tok_len[m]}x{spec.tok_dim[m]}' for m in mods)}), seconds per epoch "
              "(train + validation pass); `deterministic` is `train.deterministic` (default true):\n",
              "| head | " + " | ".join(f"{d} deterministic" for d in devices)
              + (" | cuda non-deterministic | GPU speed-up (deterministic / not) |" if "cuda" in devices else " |"),
              "|---|" + "---|" * (len(devices) + 2 * ("cuda" in devices))]
    for name in ("srmm", "mmp", "cmpt[trainable_block]", "cmpt[encoder+lora]"):
        if name == "cmpt[encoder+lora]" and "text" not in spec.emb_dim:
            continue
        secs = {dev: time_epoch(name, spec, data, dev, args.text_model) for dev in devices}
        extra = ""
        if "cuda" in secs:
            fast = time_epoch(name, spec, data, "cuda", args.text_model, deterministic=False)
            extra = f" {fast:.2f} | {secs['cpu'] / secs['cuda']:.1f}x / {secs['cpu'] / fast:.1f}x |"
        lines.append(f"| {name} | " + " | ".join(f"{secs[d]:.2f}" for d in devices) + " |" + extra)
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (args.out / f"train-device-{devices[-1]}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
