"""Encoder kinds by name, and the encoder blocks a head runs (CMPT, the LoRA oracle and baselines)."""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from torch import nn

from models.config import EncoderConfig
from models.errors import ConfigError, first_line
from models.heads import HeadConfig

from .base import Encoder, EncoderError, check_model_path
from .ct2_whisper import WhisperCT2Encoder
from .effnet_lite import EfficientNetLite0Encoder
from .hf import HFEncoder


T = TypeVar("T")
ENCODERS = {"efficientnet_lite0": EfficientNetLite0Encoder, "whisper_ct2": WhisperCT2Encoder,
            "minilm": HFEncoder, "hf": HFEncoder}


def build_encoder(modality: str, cfg: EncoderConfig) -> Encoder:
    """The configured encoder; a model that cannot be found or loaded is one ``EncoderError`` line."""
    return _loading(modality, cfg, lambda: ENCODERS[cfg.kind](cfg, modality))


def encoder_fingerprint(modality: str, cfg: EncoderConfig) -> dict:
    """``build_encoder(modality, cfg).fingerprint`` without loading the weights (an extraction with nothing to
    encode checks its views against it, and builds no encoder)."""
    identity = _loading(modality, cfg, lambda: ENCODERS[cfg.kind].identity(cfg, modality))
    return {"modality": modality, "id": identity["id"], "revision": identity["revision"],
            **identity["preprocessing"]}


def _loading(modality: str, cfg: EncoderConfig, load: Callable[[], T]) -> T:
    if cfg.kind in ("hf", "minilm") and modality not in ("text", "image", "audio"):
        raise EncoderError(f"encoders.{modality}: Hugging Face encoders handle text/image/audio, not {modality!r}")
    check_model_path(modality, cfg.model)
    try:
        return load()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a file of another model raises anything from torch.load or transformers
        raise EncoderError(f"encoders.{modality}.model: cannot load {cfg.model or cfg.kind!r} ({cfg.kind}): "
                           f"{first_line(e)}") from None




def load_backbones(head: HeadConfig, encoders: dict[str, EncoderConfig], emb_modalities: Iterable[str]
                   ) -> dict[str, nn.Module]:
    """Encoder transformer blocks for heads that run them (CMPT, the LoRA oracle and baselines), for the
    modalities whose store keeps embedding-layer tokens (``emb_modalities``); ``head.encoder_blocks`` says whether
    the head runs them, a unimodal head (``head.modality``) loads its own only."""
    if head.encoder_blocks == "none":
        return {}
    only = getattr(head, "modality", None)
    blocks = {}
    for m in emb_modalities:
        if only not in (None, m):
            continue
        encoder = build_encoder(m, encoders[m])  # a model that cannot load is an error either way
        try:
            b = encoder.blocks()
        except ValueError as e:  # a family without a verified replay: auto falls back, "encoder" says why
            if head.encoder_blocks == "required":
                raise ConfigError(f"head.backbone={head.backbone!r} for {m}: {e}") from None
            continue
        if b is not None:
            blocks[m] = b
    return blocks
