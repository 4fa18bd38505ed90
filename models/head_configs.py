"""Every head's config class, torch-free, so that a config file is validated without importing torch (a rejected
value costs the config's own import: about a second). A head is one module in ``models/heads`` plus its config
class here; a config class with a default ``name`` registers itself (``HEAD_CONFIGS``), and the head module pairs it
with the ``nn.Module`` (``models.heads.base.register_head``)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

HEAD_CONFIGS: dict[str, type["HeadConfig"]] = {}  # head name -> its config class


class HeadConfig(BaseModel):
    """Base of every head's config; ``name`` selects the head in the registry."""

    model_config = ConfigDict(extra="forbid")
    name: str

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.model_fields["name"].default
        if isinstance(name, str):
            if HEAD_CONFIGS.get(name, cls) is not cls:
                raise ValueError(f"head {name!r} registered twice ({HEAD_CONFIGS[name].__qualname__}, "
                                 f"{cls.__qualname__})")
            HEAD_CONFIGS[name] = cls

    @property
    def label(self) -> str:
        """Short name of this configured head: registered model names, progress bars, console columns."""
        return self.name

    @property
    def encoder_blocks(self) -> Literal["none", "optional", "required"]:
        """Whether this head runs the frozen encoders' transformer blocks (the store loads them only then):
        "optional" takes them where the store has them, "required" refuses a modality without them."""
        return "none"


def parse_head_config(raw: dict | HeadConfig) -> HeadConfig:
    """``raw`` validated by the config class its ``name`` selects."""
    if isinstance(raw, HeadConfig):
        return raw
    name = raw.get("name")
    if name not in HEAD_CONFIGS:
        raise ValueError(f"unknown head {name!r}; registered heads: {sorted(HEAD_CONFIGS)}")
    return HEAD_CONFIGS[name].model_validate(raw)


class LoRASettings(BaseModel):
    """A head's adapter settings on a frozen encoder (001 §3.5 / A3: rank 1, alpha 1, dropout 0.1)."""

    lora_rank: int = Field(1, ge=1)
    lora_alpha: float = Field(1.0, gt=0)
    lora_dropout: float = Field(0.1, ge=0, lt=1)


class LoRABackboneOption:
    """For a head config whose ``backbone`` may be "encoder+lora": its label ``<name>-lora`` and the encoder
    blocks it then takes where the store has them (a mixin: the field is the config's own)."""

    @property
    def label(self) -> str:
        return self.name + ("-lora" if self.backbone == "encoder+lora" else "")

    @property
    def encoder_blocks(self) -> str:
        return "optional" if self.backbone == "encoder+lora" else "none"


Strategy = Literal["S-1", "S-2", "S-3", "all_present_rows"]  # SRMM's modality switching (004 §V-C)


class FusionConfig(LoRABackboneOption, HeadConfig, LoRASettings):
    """``backbone``: "pooled_vector" (the papers' baselines) reads each modality's frozen pooled vector;
    "encoder+lora" (this project's extension, label ``<name>-lora``) replaces it, for every modality whose
    encoder has transformer blocks, by the class-token output of those blocks with LoRA, CMPT's stream exactly
    (same rank, alpha, dropout, class token): the baseline fine-tuned as much as CMPT is, so that a comparison
    with CMPT measures its proxy tokens and not its fine-tuning, as 001 §4.6.1's ablation (ii) does (modality
    dropout on the same LoRA-tuned encoders). Modalities without blocks keep the pooled vector."""

    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    fill: Literal["placeholder", "zeros"] = "zeros"
    backbone: Literal["pooled_vector", "encoder+lora"] = "pooled_vector"


class EarlyFusionConfig(FusionConfig):
    name: Literal["early"] = "early"


class ModalityDropoutConfig(FusionConfig):
    name: Literal["moddrop"] = "moddrop"
    p: float = Field(0.5, ge=0, le=1)


class LateFusionConfig(FusionConfig):
    """``late_average``: "present" averages the logits of the present modalities' branches only, as SRMM fuses
    (004 §III-B), so that 004 Table VI's comparison of SRMM with late fusion measures the shared branch and not
    the averaging; "all" (a VARIANT, named a deviation) averages every branch, a missing one fed its fill."""

    name: Literal["late"] = "late"
    late_average: Literal["present", "all"] = "present"


class OracleConfig(HeadConfig, LoRASettings):
    """``backbone``: "pooled_vector" reads the modality's frozen pooled vector, the input of every baseline;
    "encoder+lora" fine-tunes the modality's encoder blocks with LoRA exactly as CMPT's stream does (same rank,
    alpha, dropout, class token), the ceiling to hold CMPT against, since its streams are fine-tuned too."""

    name: Literal["oracle"] = "oracle"
    modality: str | None = None  # the one modality it sees; None: the store's first modality
    backbone: Literal["pooled_vector", "encoder+lora"] = "pooled_vector"
    hidden: int = Field(256, ge=1)  # hidden and dropout: the pooled-vector MLP's (the LoRA path is linear)
    dropout: float = Field(0.1, ge=0, lt=1)

    @property
    def label(self) -> str:
        base = f"oracle-{self.modality}" if self.modality else "oracle"
        return base + ("-lora" if self.backbone == "encoder+lora" else "")

    @property
    def encoder_blocks(self) -> str:
        return "required" if self.backbone == "encoder+lora" else "none"


class SRMMConfig(HeadConfig):
    """Modality switching strategies (004 §V-C), i.e. which modality's embedding trains the branch when:

    S-1  (paper default, used for all its results) every batch is multimodal: each sample contributes one
         randomly chosen present modality.
    S-2  each batch is, with probability 1/2 (so 50% of an epoch's batches in expectation, in random order),
         unimodal as in S-3; otherwise multimodal as in S-1.
    S-3  every batch is unimodal: one modality drawn at random per batch.
    all_present_rows  NOT a paper strategy (this project's extension): every present modality of every sample
         is a separate example in every batch.

    A unimodal batch draws its modality among those present in at least two rows of the batch (one if none is;
    BatchNorm needs two rows); rows lacking it are
    skipped from that step's loss (``HeadOutput.target_index`` lists the rows used), never fed a placeholder.

    Branch sizes follow §IV-B's FC layers {input_dim, layer_dim, layer_dim, n_classes}: ``hidden`` is layer_dim
    and ``emb_dim`` defaults to it. ``embed_scale`` is a DEVIATION from the paper (which has none, i.e. 1.0)."""

    name: Literal["srmm"] = "srmm"
    strategy: Strategy = "S-1"
    proj_dim: int = Field(512, ge=1)
    hidden: int = Field(512, ge=1)
    emb_dim: int | None = Field(None, ge=1)  # None: = hidden, as in the paper
    dropout: float = Field(0.5, ge=0, lt=1)  # §IV-B: dropout of 50%
    # DEVIATION (cosine-classifier scale on the L2-normalised embedding, not in 004): at 1.0 the bounded logits
    # underfit: fashion complete accuracy 95.8% vs 97.9% at 16
    embed_scale: float = Field(16.0, gt=0)
    # test-time fusion over the present modalities (004 §III-B: "the average of the logits obtained from the
    # softmax layer", i.e. of the softmax outputs): "prob" averages probabilities and returns their log as the
    # logits; "logit" (a VARIANT, named a deviation) averages the logits
    fusion: Literal["prob", "logit"] = "prob"


class MMPConfig(LoRABackboneOption, HeadConfig, LoRASettings):
    """``backbone``: "frozen_output" projects the frozen encoders' cached output tokens and classifies them with a
    fusion transformer (the variant forced by cached features); "encoder+lora" (000 §III-B as written, label
    ``mmp-lora``) projects the embedding-layer tokens (Eq. 1) of every modality whose encoder has transformer
    blocks and runs them, real or projected, through those frozen blocks with LoRA (CMPT's stream: same rank,
    alpha, dropout) before the fusion transformer; modalities without blocks keep their frozen output tokens."""

    name: Literal["mmp"] = "mmp"
    backbone: Literal["frozen_output", "encoder+lora"] = "frozen_output"
    d_model: int = Field(128, ge=1)
    n_agg: int = Field(8, ge=1)
    mask_p: float = Field(0.5, ge=0, le=1)
    # the unit masking draws for: "sample" (each row its own draw; a named deviation) or "batch" (000 §III-A:
    # each modality available or masked at each iteration, one draw for the whole batch)
    mask_per: Literal["sample", "batch"] = "sample"
    n_heads: int = Field(4, ge=1)
    max_tokens: int = Field(32, ge=1)  # token sequences are average-pooled (mask-aware) to at most this many
    fusion_layers: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    attn_dropout: float = Field(0.0, ge=0, lt=1)  # dropout on attention maps: costly on CPU, off by default
    align_weight: float = Field(1.0, ge=0)
    smooth_l1_beta: float = Field(1.0, gt=0)


class CMPTConfig(HeadConfig, LoRASettings):
    """CMPT (paper 001 §3; hyper-parameters from A3 Table 5). ``backbone``: "encoder" runs the encoder's own
    transformer blocks (frozen, LoRA rank ``lora_rank`` = 1, alpha 1, dropout 0.1 on q, k, v and the attention
    output, §3.5/A3) over the cached embedding-layer tokens (Eq. 1-3; Hugging Face transformers encoders, and
    CTranslate2 Whisper through its weights read into a transformers encoder); "trainable_block" is this
    project's VARIANT for encoders with no transformer blocks (EfficientNet-Lite0): cached output tokens through
    a small trainable transformer block with a learned CLS;
    "auto" picks "encoder" wherever the store provides blocks."""

    name: Literal["cmpt"] = "cmpt"
    backbone: Literal["auto", "encoder", "trainable_block"] = "auto"
    lam: float = Field(0.2, ge=0)  # Eq. 7
    d_model: int = Field(256, ge=1)  # trainable-block width, and the fusion width when stream widths differ
    max_tokens: int = Field(32, ge=1)  # trainable-block streams pool cached tokens (mask-aware) to this many
    block_layers: int = Field(1, ge=1)
    n_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    attn_dropout: float = Field(0.0, ge=0, lt=1)

    @property
    def label(self) -> str:  # every stream a trainable block: the ablation beside CMPT's own path
        return self.name + ("-block" if self.backbone == "trainable_block" else "")

    @property
    def encoder_blocks(self) -> str:
        return {"auto": "optional", "encoder": "required", "trainable_block": "none"}[self.backbone]
