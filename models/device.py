"""The one device resolver: training, evaluation and the frozen encoders all place their tensors with it."""
from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(choice: str, setting: str = "device") -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; ``cuda`` without CUDA is refused (naming ``setting``), never
    silently moved to the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}='cuda' but CUDA is not available on this machine; use 'auto' or 'cpu'")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")
