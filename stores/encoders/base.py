"""What every frozen encoder shares: raw-input loaders (image, audio, text), the ``Encoded`` features, the
``Encoder`` interface and the precision, revision and pooling helpers."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import os
import re
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import ConfigError
from stores.config_files import missing_model_path
from torch import nn




LOAD_WORKERS = min(8, os.cpu_count() or 1)  # threads decoding raw inputs (PIL and wave release the GIL)
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default limit (EncoderConfig.max_image_pixels sets an encoder's)
MIN_SAMPLE_RATE = 4000  # below this, speech and most sounds are gone: the header is wrong or the file is not audio


class BadInput(ValueError):
    """An input that cannot be decoded; extraction records the modality as missing with this reason."""


class EncoderError(ConfigError):
    """An encoder that cannot be built as configured (no model at that path, a hub id not cached while
    offline, a file of another model): one line naming ``encoders.<modality>.model``, exit 2, never retried."""


def check_model_path(modality: str, model: str | None) -> None:
    if why := missing_model_path(modality, model):
        raise EncoderError(why)


@dataclass
class Encoded:
    vec: np.ndarray  # [B, D] float32 pooled
    tok: list[np.ndarray]  # per item [T_i, Dt] float16 output tokens
    emb: list[np.ndarray] | None = None  # per item [T_i, Dh] float16 embedding-layer tokens (HF, CT2 Whisper)

    def item(self, i: int = 0) -> dict[str, Any]:
        """Item ``i``'s features as the store writes them: ``{vec, tok, emb}``."""
        return {"vec": self.vec[i], "tok": self.tok[i], "emb": self.emb[i] if self.emb is not None else None}


# ------------------------------------------------------------------------------------------------ raw inputs
def load_image_uint8(ref: Any, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """[size, size, 3] uint8 RGB from a path, bytes or an array (grey images become RGB): decoded and resized
    on the host, scaled to float on the encoder's device (a quarter of the bytes to stack and copy). An image
    whose header declares more than ``max_pixels`` is refused before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # the limit is ``max_pixels``, checked below from the header
    try:
        if isinstance(ref, np.ndarray):
            img = Image.fromarray(ref)
        else:
            img = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
            if img.width * img.height > max_pixels:
                raise BadInput(f"image too large: {img.width}x{img.height} pixels, over the {max_pixels} of "
                               "encoders.<modality>.max_image_pixels")
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, BadInput):
            raise
        # PIL names the file it was given; for inline bytes that is ``<_io.BytesIO object at 0x...>``
        raise BadInput(f"unreadable image: {re.sub(r'<_io.BytesIO object at 0x[0-9a-f]+>', 'inline bytes', str(e))}") \
            from None
    return torch.from_numpy(np.array(img.convert("RGB").resize((size, size), Image.BICUBIC)))  # writable copy


def stage_uint8(items: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack uint8 HWC images and copy them to ``device``: through pinned memory, asynchronously, on CUDA."""
    x = torch.stack(items)
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x


def to_host(x: torch.Tensor) -> np.ndarray:
    """A device tensor as a host array; CUDA copies land in pinned memory (one synchronising copy)."""
    if x.device.type != "cuda":
        return x.numpy()
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return out.numpy()


def load_audio(ref: Any, target_sr: int = 16000) -> np.ndarray:
    """Mono float32 at ``target_sr`` from a PCM wav (a path or its bytes; any rate, resampled) or an array at
    target_sr."""
    if isinstance(ref, np.ndarray):
        return ref.astype(np.float32)
    try:
        with wave.open(io.BytesIO(ref) if isinstance(ref, bytes) else str(ref), "rb") as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise BadInput(f"unreadable audio: {e}") from None
    if n == 0 or not raw:
        raise BadInput("empty audio (0 samples)")
    if sr < MIN_SAMPLE_RATE:
        raise BadInput(f"sample rate {sr} Hz is below the {MIN_SAMPLE_RATE} Hz minimum (wrong rate in the header?)")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise BadInput(f"unsupported wav sample width {width} bytes")
    x = np.frombuffer(raw[: len(raw) // (width * ch) * width * ch], dtype=dtype).astype(np.float32)
    x = (x - 128) / 128 if width == 1 else x / float(np.iinfo(dtype).max)
    x = x.reshape(-1, ch).mean(1)
    if sr != target_sr:
        from scipy.signal import resample_poly
        g = np.gcd(sr, target_sr)
        x = resample_poly(x, target_sr // g, sr // g).astype(np.float32)
    return x


def load_text(ref: Any) -> str:
    if isinstance(ref, bytes):
        try:
            ref = ref.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"text is not UTF-8: {e}") from None
    text = "" if ref is None else str(ref)
    if not text.strip():
        raise BadInput("empty text")
    return text


PLACEHOLDERS = {"text": "", "image": np.zeros((224, 224, 3), dtype=np.uint8), "audio": np.zeros(8000, np.float32)}


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the frozen forward pass where asked (auto: on CUDA only)."""
    bf16 = precision == "bfloat16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def package_revision(dist: str) -> str:
    try:
        return f"{dist}=={md.version(dist)}"
    except md.PackageNotFoundError:
        return dist


def folder_revision(path: Path) -> str:
    """Hash of a local model folder's config files (weights are identified by their size)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes() if f.suffix in (".json", ".txt") else str(f.stat().st_size).encode())
    return h.hexdigest()[:12]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def split_tokens(x: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    x = x.half().cpu().numpy()  # torch's float16 cast: same bits as numpy's, ~7x faster, and on the GPU
    lengths = mask.sum(1).cpu().tolist()
    # tokens are right-padded by every tokenizer/feature extractor used here
    return [x[i, : max(int(n), 1)] for i, n in enumerate(lengths)]


# ------------------------------------------------------------------------------------------------ encoders
class Encoder:
    modality: str
    id: str
    revision: str
    preprocessing: dict

    def load(self, ref: Any) -> Any:
        raise NotImplementedError

    def encode(self, items: list[Any]) -> Encoded:
        raise NotImplementedError

    def blocks(self) -> nn.Module | None:
        """The frozen transformer blocks over embedding-layer tokens (CMPT's faithful path), if any."""
        return None

    def encode_placeholder(self) -> Encoded:
        """The missing-modality input (empty string, zero image, silent audio) through this same encoder; computed
        once (the encoder is frozen), not per served request or extracted chunk."""
        if getattr(self, "_placeholder", None) is None:
            raw = PLACEHOLDERS[self.modality]
            self._placeholder = self.encode([raw if self.modality == "text" else self.load(raw)])
        return self._placeholder

    @property
    def fingerprint(self) -> dict:
        return {"modality": self.modality, "id": self.id, "revision": self.revision, **self.preprocessing}


