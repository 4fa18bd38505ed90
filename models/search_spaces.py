"""Hyper-parameter search spaces, one entry per registered head (data only; runs/tune.py samples them).

Keys are dotted config paths (``train.lr``, ``head.hidden``); values name an Optuna distribution:
``{"float": [low, high], "log": bool}``, ``{"int": [low, high]}`` or ``{"choice": [...]}``. Every head gets the
same shared optimisation knobs plus a few of its own (width, dropout, its loss weight or masking rate), so an
equal trial budget means an equal search effort. Adding a head adds one entry here.
"""
from __future__ import annotations

OPTIMISER = {
    "train.lr": {"float": [1e-4, 3e-3], "log": True},
    "train.weight_decay": {"float": [1e-4, 1e-1], "log": True},
    "train.patience": {"int": [3, 8]},
}
DROPOUT = {"float": [0.0, 0.5]}

SEARCH_SPACE: dict[str, dict[str, dict]] = {
    "early": {**OPTIMISER, "head.hidden": {"choice": [128, 256, 512]}, "head.dropout": DROPOUT},
    "late": {**OPTIMISER, "head.hidden": {"choice": [128, 256, 512]}, "head.dropout": DROPOUT},
    "moddrop": {**OPTIMISER, "head.hidden": {"choice": [128, 256, 512]}, "head.dropout": DROPOUT,
                "head.p": {"float": [0.1, 0.7]}},
    "srmm": {**OPTIMISER, "head.hidden": {"choice": [256, 512, 1024]}, "head.dropout": {"float": [0.1, 0.6]},
             "head.embed_scale": {"float": [4.0, 32.0], "log": True}},
    "mmp": {**OPTIMISER, "head.d_model": {"choice": [64, 128, 256]}, "head.dropout": DROPOUT,
            "head.mask_p": {"float": [0.2, 0.7]}, "head.align_weight": {"float": [0.1, 3.0], "log": True}},
    "cmpt": {**OPTIMISER, "head.d_model": {"choice": [128, 256]}, "head.dropout": DROPOUT,
             "head.lam": {"float": [0.05, 1.0], "log": True}},
    "oracle": {**OPTIMISER, "head.hidden": {"choice": [128, 256, 512]}, "head.dropout": DROPOUT},
}
