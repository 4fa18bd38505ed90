"""CMPT's encoder streams with and without ``trim_padding`` (the batch's all-padding token tail), in one run on
real stored tokens: seconds per training epoch (forward + backward of the encoder blocks with LoRA), and how far
apart the two are on one trained head in eval mode. (Trained with and without, two heads differ as two seeds do:
dropout draws its masks by tensor shape, so a shorter batch consumes the random stream differently.)

    python bench/padding_trim.py -c configs/fashion_colour.yaml [--rows 512] [--repeats 2]

The two variants alternate (on, off, on, off, ...) so machine load falls on both alike.
"""
from __future__ import annotations

import argparse
import time

import torch

import models.heads.cmpt as cmpt_module
from stores.config_files import load_config
from models.heads import build_head, parse_head_config
from models.training import TrainConfig, batches, predict, seed_everything
from stores.features.feature_store import open_store
from stores.encoders import load_backbones


def untrimmed(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x, mask


def epoch_seconds(cfg, spec, meta, data, trim: bool) -> tuple[float, torch.nn.Module]:
    """One training epoch of a fresh CMPT (same seed), and the trained head."""
    cmpt_module.trim_padding = trim_fn[trim]
    seed_everything(0)
    backbones = load_backbones(cfg.head, cfg.encoder_configs(), meta.emb_dim)
    head = build_head(parse_head_config({"name": "cmpt"}), spec, backbones)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-3)
    head.train()
    t0 = time.perf_counter()
    for b in batches(data, 128, torch.Generator().manual_seed(0)):
        opt.zero_grad(set_to_none=True)
        out = head(b)
        (torch.nn.functional.cross_entropy(out.logits.float(), b.y) + out.aux_loss).backward()
        opt.step()
    secs = time.perf_counter() - t0
    return secs, head


def eval_logits(head, data, trim: bool) -> torch.Tensor:
    cmpt_module.trim_padding = trim_fn[trim]
    return predict(head, data, TrainConfig(device="cpu", eval_batch_size=128))


trim_fn = {True: cmpt_module.trim_padding, False: untrimmed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-c", "--config", default="configs/fashion_colour.yaml")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(args.config)
    store = open_store(cfg)
    spec = store.spec()
    data = store.read_split("train", ("emb", "tok")).batch
    data = data.map(lambda t: t[: args.rows]).to("cpu")
    meta = store.meta
    lengths = {m: data.emb_mask[m].sum(1).float() for m in data.emb_mask}
    print("stored token lengths: " + ", ".join(f"{m} mean {v.mean():.1f} of {data.emb[m].shape[1]}"
                                               for m, v in lengths.items()))
    secs: dict[bool, list[float]] = {True: [], False: []}
    head = None
    for _ in range(args.repeats):
        for trim in (True, False):
            s, head = epoch_seconds(cfg, spec, meta, data, trim)
            secs[trim].append(s)
            print(f"trim={trim}: {s:.1f} s/epoch", flush=True)
    on, off = min(secs[True]), min(secs[False])
    logits = {trim: eval_logits(head, data, trim) for trim in (True, False)}
    diff = (logits[True] - logits[False]).abs().max().item()
    agree = (logits[True].argmax(1) == logits[False].argmax(1)).float().mean().item()
    print(f"\n| rows | untrimmed s/epoch | trimmed s/epoch | speed-up | max logit difference | same argmax |\n"
          f"|---|---|---|---|---|---|\n| {data.size} | {off:.1f} | {on:.1f} | {off / on:.2f}x | {diff:.1e} | "
          f"{100 * agree:.1f}% |")


if __name__ == "__main__":
    main()
