"""Frozen pretrained encoders, one module per family: ``effnet_lite`` (EfficientNet-Lite0 in plain torch),
``ct2_whisper`` (Whisper tiny.en in CTranslate2), ``hf`` (any transformers model id or local path, with the exact
replay of its blocks), on the shared ``base``; ``stream`` decodes inputs on threads while a batch encodes;
``registry`` builds one by kind. Imports ``models`` and ``stores.config_files`` (the model-path check) only."""
from .base import LOAD_WORKERS, BadInput, Encoded, Encoder, EncoderError
from .registry import ENCODERS, build_encoder, encoder_fingerprint, load_backbones

__all__ = ["LOAD_WORKERS", "BadInput", "Encoded", "Encoder", "EncoderError", "ENCODERS", "build_encoder",
           "encoder_fingerprint", "load_backbones"]
