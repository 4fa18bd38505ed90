"""The papers' constants as data, and the one place that names where a run departs from them.

``PAPER`` holds, per head, the values its paper states (000 MMP, 001 CMPT, 004 SRMM and the late-fusion baseline
004 compares SRMM with), each with the section that states it: the head's own fields (``head``) and its training
recipe (``recipe``, in the papers' terms: see ``recipe``). ``PROTOCOL`` holds what the papers' evaluation protocols
fix for every head (checkpoint selection). ``deviations`` compares a config with them and names each value that
differs (``lam=0.847``, ``schedule=cosine``); ``runs.train`` puts the names in the run's variant label and MLflow
``deviation`` tag, and bench/protocols.py's tables show them. A value no paper states is not compared; what a head
departs from by construction (e.g. SRMM's ``per_modality_proj``, CMPT's ``trainable_block``) is named by the head
itself (``Head.variant["deviation"]``). Pure: no I/O, no torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .config import EvalConfig, TrainConfig
from .head_configs import HEAD_CONFIGS, HeadConfig, parse_head_config


@dataclass(frozen=True)
class Constant:
    """A paper's value and where it says so. ``value`` may be ``{"audio": a, "text": t}`` where the paper sets
    it per modality pair (audio-visual vs textual-visual data; see ``pair``)."""

    value: Any
    source: str


C = Constant
A3 = "001 A3 Table 5"  # CMPT's hyper-parameters: image-text column, audio-video column
PAPER: dict[str, dict[str, dict[str, Constant]]] = {
    "cmpt": {
        "head": {"lam": C(0.2, "001 Eq. 7, " + A3), "lora_rank": C(1, "001 §3.5, " + A3),
                 "lora_alpha": C(1.0, A3), "lora_dropout": C(0.1, A3)},
        "recipe": {"optimizer": C("adamw", "001 §4.2, " + A3), "lr": C({"text": 1e-3, "audio": 5e-5}, A3),
                   "weight_decay": C(0.02, A3), "schedule": C("poly0.9", A3),
                   "warmup": C("5ep_0.1x", "001 §4.2: the first 5 epochs at 0.1x the learning rate"),
                   "batch_size": C({"text": 8, "audio": 4}, A3), "epochs": C({"text": 10, "audio": 100}, A3),
                   "early_stop": C(0, "001 §4.2, " + A3 + ": a fixed number of epochs"),
                   "grad_clip": C(0.0, "001 A3: no clipping stated")},
    },
    "mmp": {
        "head": {"mask_p": C(0.5, "000 §III-A"),
                 "mask_per": C("batch", "000 §III-A: each modality available or masked at each iteration"),
                 "n_agg": C(8, "000 §III-B: eight aggregated tokens"), "align_weight": C(1.0, "000 Eq. 7"),
                 "smooth_l1_beta": C(1.0, "000 Eq. 6: Smooth L1")},
        "recipe": {"optimizer": C("adamw", "000 §IV-B")},
    },
    "srmm": {
        "head": {"strategy": C("S-1", "004 §V-C: S-1 for every reported result"),
                 "hidden": C({"text": 768, "audio": 2048}, "004 §IV-B: layer_dim"),
                 "emb_dim": C(None, "004 §IV-B: FC layers {input_dim, layer_dim, layer_dim, classes}"),
                 "dropout": C(0.5, "004 §IV-B"), "embed_scale": C(1.0, "004 §III-B: L2 norm, then the FC"),
                 "fusion": C("prob", "004 §III-B: the average of the softmax outputs of the present modalities")},
        "recipe": {"optimizer": C("adam", "004 §IV-B"), "lr": C(0.01, "004 §IV-B"),
                   "weight_decay": C(0.0, "004 §IV-B: Adam, no decay stated")},
    },
    "late": {  # the late-fusion TBN of 004 Table VI, held to SRMM's present-only average (004 §III-B)
        "head": {"late_average": C("present", "004 §III-B, Table VI")},
        "recipe": {},
    },
}
PROTOCOL = {"select": C("train_pattern", "001 A4, MAP protocol: validation at the training missing rate; "
                                         "001 A3: else a fixed number of epochs")}

# head fields compared through a derived value (the paper's value is stated of that)
VIEWS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("srmm", "emb_dim"): lambda h: None if h.emb_dim in (None, h.hidden) else h.emb_dim,
}


def pair(modalities: Sequence[str]) -> str:
    """Which of a paper's settings applies: "audio" (audio-visual data) when an audio modality is present, else
    "text" (textual-visual, the papers' main setting; also when the modalities are not known)."""
    return "audio" if "audio" in modalities else "text"


def resolve(value: Any, modalities: Sequence[str]) -> Any:
    return value[pair(modalities)] if isinstance(value, dict) else value


def recipe(train: TrainConfig) -> dict[str, Any]:
    """``train`` in the papers' terms: ``models.training.fit`` always runs AdamW with a linear warm-up."""
    return {"optimizer": "adamw", "lr": train.lr, "weight_decay": train.weight_decay,
            "schedule": "cosine" if train.schedule == "cosine" else f"poly{train.poly_power:g}",
            "warmup": f"{train.warmup_frac * train.epochs:.3g}ep_linear", "batch_size": train.batch_size,
            "epochs": train.epochs, "early_stop": train.patience if train.patience < train.epochs else 0,
            "grad_clip": train.grad_clip}


def _same(a: Any, b: Any) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) if numbers else a == b


def _named(have: dict[str, Any], paper: dict[str, Constant], modalities: Sequence[str]) -> list[str]:
    """``key=value`` for each of ``paper``'s keys whose value in ``have`` differs."""
    out = []
    for key, c in paper.items():
        v = have[key]
        if not _same(v, resolve(c.value, modalities)):
            out.append(f"{key}={v:.3g}" if isinstance(v, float) else f"{key}={v}")
    return out


def deviations(head: HeadConfig, train: TrainConfig | None = None, evaluation: EvalConfig | None = None,
               modalities: Sequence[str] = ()) -> list[str]:
    """Names of the values of ``head`` (and of ``train``'s recipe, and of the checkpoint selection when
    ``evaluation.paper_protocol``) that differ from ``PAPER`` / ``PROTOCOL``; [] for a head no paper states."""
    paper = PAPER.get(head.name, {})
    stated = paper.get("head", {})
    fields = {k: VIEWS[head.name, k](head) if (head.name, k) in VIEWS else getattr(head, k) for k in stated}
    out = _named(fields, stated, modalities)
    if train is not None:
        out += _named(recipe(train), paper.get("recipe", {}), modalities)
    if evaluation is not None and evaluation.paper_protocol:
        out += _named({"select": evaluation.select_on}, PROTOCOL, modalities)
    return out


def paper_head(name: str, modalities: Sequence[str] = ()) -> HeadConfig | None:
    """The head config with its paper's values (the rest at their defaults); None for a head no paper states."""
    if name not in PAPER:
        return None
    fields = HEAD_CONFIGS[name].model_fields
    return parse_head_config({"name": name, **{k: resolve(c.value, modalities) for k, c in PAPER[name]["head"].items()
                                               if k in fields}})
