"""The one typed config tree (pydantic, extra="forbid", ranges checked at validation). Schemas only: YAML files,
``extends:`` and ``--set`` overrides are read by ``stores.config_files``.

A field marked ``RUNTIME`` changes how or where work runs, never a feature, a view name or a trained result;
``runtime_fields`` derives from that one mark what view names, store names and the training cache leave out."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, WithJsonSchema,
                      field_validator, model_validator)

from .errors import ConfigError  # noqa: F401  (re-exported: every layer catches it from here)
from .head_configs import HEAD_CONFIGS, HeadConfig, parse_head_config
from .patterns import MissingPattern

RUNTIME = {"runtime": True}  # json_schema_extra of a runtime field (see the module docstring)


def runtime_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The ``exclude`` tree of ``model``'s RUNTIME fields, sections included (``{"store": {"root": True}}``, a dict
    of sections as ``{"encoders": {"__all__": {...}}}``), for ``model_dump(exclude=...)``."""
    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("runtime"):
            out[name] = True
            continue
        for t in (f.annotation, *get_args(f.annotation)):  # a section, ``Section | None`` or ``dict[str, Section]``
            keyed = get_origin(t) is dict
            section = get_args(t)[1] if keyed else t
            if isinstance(section, type) and issubclass(section, BaseModel) and (nested := runtime_fields(section)):
                out[name] = {"__all__": nested} if keyed else nested
                break
    return out


def to_overrides(tree: dict, prefix: str = "") -> list[str]:
    """A config tree as ``--set`` arguments."""
    out = []
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out += to_overrides(v, key) if isinstance(v, dict) else [f"{key}={v}"]
    return out


Rate = Annotated[float, Field(ge=0, le=1)]  # a missing rate
Seed = Annotated[int, Field(ge=0)]  # numpy and torch generators take non-negative seeds


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    dataset: Literal["avmnist", "fashion", "manifest", "food101", "mmimdb"] = "avmnist"
    # names the store's dataset table, the MLflow experiment and the registered models; default: the manifest
    # file's stem (a folder's or a glob's folder name) for dataset=manifest, else the dataset name
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # None: $MM_DATASETS_DIR, else ../shared/datasets beside the checkout (stores.datasets.datasets_root)
    data_dir: Path | None = Field(None, json_schema_extra=RUNTIME)
    # for dataset=manifest: a file, a folder or a glob of shards, local or a URI (s3://bucket/prefix/*.parquet):
    # CSV / JSONL / Parquet with id, split, label, <modality>, WebDataset .tar shards, or a Hugging Face
    # save_to_disk folder (README "Your own data at scale")
    manifest: Path | str | None = None
    # manifest: the shards' format; auto = by suffix (.parquet .jsonl .json .csv .tar .arrow), a folder holding
    # state.json or dataset_dict.json is hf
    format: Literal["auto", "parquet", "jsonl", "csv", "webdataset", "hf"] = "auto"
    # manifest: the source's column for each field, e.g. {image: img, text: caption}; unnamed fields keep their
    # own names. Without an id column a row's id is <split>-<its index in the split>; without a split column,
    # the shard's path names it (a train/ val/ validation/ test/ folder or a train-*.parquet file)
    columns: dict[Literal["id", "split", "label", "image", "text", "audio"], str] = Field(default_factory=dict)
    classes: list[str] | None = None  # manifest: the label set (fixed class indices); other labels are errors
    # manifest: folders, besides the manifest's own, that its file paths may point into; a path resolving
    # anywhere else (``../../etc/passwd``, a symlink out of the data) is stored as missing, never opened
    allowed_roots: list[Path] = Field(default_factory=list, json_schema_extra=RUNTIME)
    label_field: str = "subCategory"  # fashion: subCategory or masterCategory
    min_per_class: int = Field(10, ge=1)
    test_speakers: list[str] = Field(default_factory=lambda: ["theo", "yweweler"])  # avmnist held-out speakers
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    limit: int | None = Field(None, ge=1)  # first N records per split-shuffle, for smoke runs
    seed: int = Field(0, ge=0)
    # manifest and fashion: source columns kept with each row in the store's dataset table (as text), for
    # missing patterns that depend on them (MissingPattern kind by_column) and for reading back
    attributes: list[str] = Field(default_factory=list)

    @field_validator("manifest", mode="before")
    @classmethod
    def _local_path(cls, v: Any) -> Any:
        """A URI stays text; anything else is a local path (a glob too)."""
        return Path(v) if isinstance(v, str) and "://" not in v else v

    @model_validator(mode="after")
    def _attributes_source(self) -> "DataConfig":
        if self.attributes and self.dataset not in ("manifest", "fashion"):
            raise ValueError(f"data.attributes keeps manifest (or fashion styles.csv) columns; dataset "
                             f"{self.dataset!r} has none")
        return self

    @field_validator("attributes")
    @classmethod
    def _attribute_names(cls, v: list[str]) -> list[str]:
        if bad := [a for a in v if not a.strip() or a in ("id", "split", "label", "image", "text", "audio")]:
            raise ValueError(f"data.attributes: {bad[0]!r} is not an extra column (id, split, label and the "
                             "modalities are stored already)")
        if len(set(v)) < len(v):
            raise ValueError("data.attributes names a column twice")
        return v

    @field_validator("columns")
    @classmethod
    def _named(cls, v: dict[str, str]) -> dict[str, str]:
        if blank := [k for k, c in v.items() if not c.strip()]:
            raise ValueError(f"data.columns.{blank[0]} is empty: name the source's column, or leave the field out")
        return v

    @property
    def source_name(self) -> str:
        """The manifest's stem (``items.csv`` -> items), a folder's name (``shards/``, ``s3://b/shards``) or a
        glob's folder (``s3://b/shards/*.parquet`` -> shards); read from the text alone."""
        parts = [p for p in re.split(r"[/\\]+", str(self.manifest).split("://", 1)[-1]) if p] or ["manifest"]
        glob = next((i for i, p in enumerate(parts) if re.search(r"[*?\[]", p)), None)
        if glob is not None:
            return parts[glob - 1] if glob else "manifest"
        last = Path(parts[-1].removesuffix(".gz"))
        return last.stem if last.suffix in (".csv", ".jsonl", ".json", ".parquet", ".tar", ".tgz", ".arrow") \
            else last.name

    @property
    def dataset_name(self) -> str:
        """The user-facing dataset name: ``name``, else the manifest's ``source_name``, else the adapter name."""
        if self.name:
            return self.name
        if self.dataset == "manifest" and self.manifest is not None:
            return self.source_name
        return self.dataset


class EncoderConfig(Strict):
    """kind: efficientnet_lite0 | minilm | whisper_ct2 (offline packages) or hf (any model id or local path)."""

    kind: Literal["efficientnet_lite0", "minilm", "whisper_ct2", "hf"]
    model: str | None = None  # HF id or local path; defaults to the offline package's files
    batch_size: int = Field(32, ge=1, json_schema_extra=RUNTIME)
    max_length: int = Field(64, ge=1)  # text tokens
    audio_seconds: float = Field(3.0, gt=0)
    image_size: int = Field(224, ge=1)
    # images over this many pixels are stored as missing ("image too large"), never decoded: a decompression bomb
    # (a 389 KB PNG of 20000x20000) would take 1.2 GB. PIL's own limit by default
    max_image_pixels: int = Field(89_478_485, ge=1, json_schema_extra=RUNTIME)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=RUNTIME)
    # compute precision of the frozen forward pass; auto = bf16 autocast on CUDA, float32 on CPU. Like device,
    # a runtime choice: it does not name a new store (features agree to ~1e-2 relative)
    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", json_schema_extra=RUNTIME)
    # image decoding: "host" (PIL on CPU threads) or "device" (nvJPEG via torchvision on CUDA, resized there with
    # antialiased bicubic: host decoding caps a GPU at ~1.5k img/s). Device-decoded features differ slightly,
    # so "device" names its own features
    decode: Literal["host", "device"] = "host"
    # keep embedding-layer tokens (CMPT's encoder path reads them): None = the kind's default, on for hf/minilm,
    # off for whisper_ct2 (its whole-chunk tokens add ~115 KB a clip and make CMPT ~5x slower an epoch on CPU)
    embedding_tokens: bool | None = None


DEFAULT_ENCODERS = {
    "avmnist": {"image": {"kind": "efficientnet_lite0"}, "audio": {"kind": "whisper_ct2"}},
    "fashion": {"image": {"kind": "efficientnet_lite0"}, "text": {"kind": "minilm"}},
    "food101": {"image": {"kind": "efficientnet_lite0"}, "text": {"kind": "minilm"}},
    "mmimdb": {"image": {"kind": "efficientnet_lite0"}, "text": {"kind": "minilm"}},
    "manifest": {"image": {"kind": "efficientnet_lite0"}, "text": {"kind": "minilm"}},
}


def _store_root(value: Any) -> Any:
    """A URI (``s3://bucket/prefix``) stays a string (a Path would fold ``s3://`` into ``s3:/``); else a Path."""
    return value if isinstance(value, str) and "://" in value else Path(value) if isinstance(value, str) else value


StoreRoot = Annotated[Path | str, BeforeValidator(_store_root)]
SECRET_OPTION = re.compile(r"secret|token|password|account_key|sas|service_account_key")


class StoreConfig(Strict):
    # a folder (tracked by data.dvc) or an object-store URI: s3://bucket/prefix (also gs://, az://), whose
    # versions are the Lance table versions (pinned by `versions`); DVC versioning applies to folders only
    root: StoreRoot = Field(Path("data/store"), json_schema_extra=RUNTIME)
    # object-store settings in Lance's names (aws_endpoint, aws_region, allow_http, ...) over the AWS_* variables;
    # put credentials in the environment, not here (the config is logged to MLflow; secrets are left out of it)
    storage_options: dict[str, str] = Field(default_factory=dict, json_schema_extra=RUNTIME)
    # local folder for the decoded split cache and, on non-S3 URIs, the writer locks; default: beside the tables
    # for a folder, ~/.cache/mmrobust/<name of the URI> for a URI
    cache_dir: Path | None = Field(None, json_schema_extra=RUNTIME)

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        if secret := [k for k in v if SECRET_OPTION.search(k.lower())]:
            raise ValueError(f"{secret} look like credentials: set them in the environment (AWS_SECRET_ACCESS_KEY, "
                             "AWS_SESSION_TOKEN, ...), not in the config, which is logged to MLflow and Prefect")
        return v
    # rows per committed Lance write (the unit lost by a crash; each commit is a Lance version until the end of the
    # run prunes it: stores/features/history.py)
    write_every: int = Field(512, ge=1)
    # who encodes: "local" (this process, decoding on a thread pool) or "ray" (one streaming Ray Data job: decode
    # tasks + ray.encode_actors encoder actors on the cluster of the ray section); the same commits either way
    extract_engine: Literal["local", "ray"] = "local"
    index_min_rows: int = Field(1024, ge=1)  # build an IVF-PQ index on pooled vectors at this many rows
    # retrain the index (new IVF centroids and PQ codebooks) once the table has grown by this factor since they
    # were trained; until then an extraction adds its new rows to the existing index (Lance's optimize_indices)
    index_retrain_growth: float = Field(2.0, ge=1)
    # k-means iterations training the index's IVF centroids (Lance's default: 50; faiss trains IVF with 10). 10
    # halved the build (100k x 384-d: 48 -> 21 s; 300k: 60 -> 34 s) at the same recall@10 with nprobes 20 and
    # re-ranking: bench/RESULTS.md, "Issue 21, eleventh pass"
    index_kmeans_iterations: int = Field(10, ge=1, le=1000, json_schema_extra=RUNTIME)
    # an extraction compacts each table it wrote whose latest version holds more data files (fragments) than this
    max_fragments: int = Field(8, ge=1)
    # an extraction keeps each table's final version (tagged), pinned ones and those younger than this; the commits
    # in between go when it ends (stores/features/history.py)
    version_grace_s: float = Field(600.0, ge=0)
    lock_timeout_s: float = Field(0.0, ge=0)  # a second writer waits this long for the lock, then fails clearly
    dvc_repo: Path = Path(".")  # the git/DVC repository whose data.dvc tracks the store's top folder
    # default DVC remote: a folder (relative to dvc_repo, or absolute) or a URI such as s3://bucket/path
    dvc_remote: str = Field("data-remote", json_schema_extra=RUNTIME)
    # `dvc remote modify` settings for it, e.g. {endpointurl: http://minio:9000} for an S3-compatible server
    dvc_remote_options: dict[str, str] = Field(default_factory=dict, json_schema_extra=RUNTIME)
    # keep decoded splits as .npy next to the table (keyed by Lance version), memory-map them
    read_cache: bool = Field(True, json_schema_extra=RUNTIME)
    # time travel: pin the Lance version a run reads, per part: "dataset" (the dataset table) and each modality's
    # feature view, e.g. {dataset: 3, text: 7}; unpinned parts read the latest. Runs log what they read
    versions: dict[str, int] = Field(default_factory=dict)


class EvalConfig(Strict):
    test_rates: list[Rate] = Field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7, 0.9, 1.0], min_length=1)
    extra_patterns: list[MissingPattern] = Field(default_factory=list)
    # checkpoint choice on the validation split: under the training pattern only, or averaged with each
    # modality absent too ("robust"), so complete-data saturation does not stop training early
    select_on: Literal["train_pattern", "robust"] = "robust"
    # the run follows one of the papers' protocols (bench/protocols.py): its selection is then held to theirs
    # (select_on train_pattern, 001 A4) and "robust" is named a deviation (models.paper)
    paper_protocol: bool = False


class TrackingConfig(Strict):
    uri: str = "sqlite:///mlruns/mlflow.db"
    # a folder, or a URI such as s3://bucket/path (endpoint: MLFLOW_S3_ENDPOINT_URL, credentials: AWS_* variables)
    artifact_root: str = "mlruns/artifacts"
    experiment: str | None = None  # default: the dataset name
    register_models: bool = True
    # the registered model abstains (with the reason) when its top probability is under this; 0: always answers
    abstain_below: float = Field(0.0, ge=0, lt=1)
    # a tracking server that does not answer /health within this fails the run
    connect_timeout_s: float = Field(20.0, gt=0)


class SweepConfig(Strict):
    heads: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": n} for n in
                                                                  ["early", "late", "moddrop", "srmm", "mmp", "cmpt"]])
    train_patterns: list[MissingPattern] = Field(default_factory=lambda: [MissingPattern()])
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    max_parallel: int = Field(2, ge=1)  # concurrent training tasks; 1 per GPU is the safe default on GPU workers
    # process: a local process pool of max_parallel workers; ray: one Ray task per run (see the ray section)
    runner: Literal["process", "ray"] = "process"
    # `mm pipeline`: tune every head first (the tune section's budget, the same for each, on validation only)
    # and sweep with each head's tuned settings: for datasets where a head's advantage needs per-dataset tuning
    tune_first: bool = False

    @field_validator("heads")
    @classmethod
    def _known_heads(cls, v: list[dict]) -> list[dict]:
        for h in v:
            parse_head_config(h)
        return v


class TrainConfig(Strict):
    """The optimiser, schedule and stopping of one training run (``models.training.fit``)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_frac: float = Field(0.05, ge=0, le=1)
    schedule: Literal["cosine", "poly"] = "cosine"
    poly_power: float = Field(1.0, gt=0)
    patience: int = Field(6, ge=1)
    grad_clip: float = Field(1.0, ge=0)  # 0: no clipping
    eval_batch_size: int = Field(512, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    deterministic: bool = True


class ScheduleConfig(Strict):
    pipeline_cron: str = "0 3 * * *"
    extract_cron: str = "0 2 * * *"
    timezone: str = "UTC"


class RayConfig(Strict):
    """Where and with what resources Ray runs sweep tasks (sweep.runner: ray) and Ray Data encoding
    (store.extract_engine: ray)."""

    address: str | None = None  # None: start a local cluster; "auto" or "ray://head:10001": an existing one
    num_cpus: int | None = Field(None, ge=1)  # size of a local cluster (None: every core); ignored with an address
    num_cpus_per_task: float = Field(1.0, gt=0)  # CPUs reserved per training task (also its torch threads)
    num_gpus_per_task: float | None = Field(None, ge=0)  # None: 1 when the cluster has GPUs, else 0
    encode_actors: int = Field(1, ge=1)  # Ray Data encoder actors (one GPU each when the cluster has GPUs)
    encode_cpus_per_actor: float = Field(1.0, gt=0)  # CPUs reserved per encoder actor (also its torch threads)
    window_rows: int = Field(16_384, ge=1)  # rows per streaming Ray Data encoding job (bounds the inputs in flight)
    # passed to ray.init, e.g. {env_vars: {MLFLOW_S3_ENDPOINT_URL: ...}} or {working_dir: .} for a remote cluster
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class TuneConfig(Strict):
    """``mm tune``: an equal Optuna budget per head, scored on the validation split only."""

    heads: list[str] | None = None  # heads to tune, each with the same budget; None: the config's head
    n_trials: int = Field(20, ge=1)
    timeout_s: float | None = Field(None, gt=0)  # per head, on top of n_trials
    # the objective: the best epoch's validation primary metric, under the training pattern only or averaged
    # with each modality absent ("robust"); sets eval.select_on in every trial
    metric: Literal["train_pattern", "robust"] = "robust"
    seed: int = 0  # TPE sampler seed
    prune: bool = True  # median pruner on the per-epoch validation score
    start_from_defaults: bool = True  # trial 0 runs the config's own values of the searched knobs
    out_dir: Path = Path("configs/tuned")  # best params as <dataset>-<head>.yaml
    # set by the tuned files ``mm tune`` writes (their name): a run of one is named ``...-tuned`` in MLflow
    applied: str | None = None

    @field_validator("heads")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        for h in v or []:
            if h not in HEAD_CONFIGS:
                raise ValueError(f"unknown head {h!r}; registered heads: {sorted(HEAD_CONFIGS)}")
        return v


class ExperimentConfig(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    encoders: dict[str, EncoderConfig] | None = None  # modality -> encoder; None: the dataset's defaults
    store: StoreConfig = Field(default_factory=StoreConfig)
    # the JSON schema (Prefect deployment parameters) admits any registered head's fields; python-side
    # validation is the head's own strict config class
    head: Annotated[SerializeAsAny[HeadConfig], WithJsonSchema({
        "type": "object", "required": ["name"], "additionalProperties": True,
        "properties": {"name": {"type": "string", "enum": sorted(HEAD_CONFIGS)}}})] = Field(
        default_factory=lambda: parse_head_config({"name": "mmp"}))
    train_pattern: MissingPattern = Field(default_factory=MissingPattern)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: Seed = 0
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, json_schema_extra=RUNTIME)
    sweep: SweepConfig = Field(default_factory=SweepConfig, json_schema_extra=RUNTIME)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, json_schema_extra=RUNTIME)
    ray: RayConfig = Field(default_factory=RayConfig, json_schema_extra=RUNTIME)
    tune: TuneConfig = Field(default_factory=TuneConfig, json_schema_extra=RUNTIME)

    @field_validator("head", mode="before")
    @classmethod
    def _head(cls, v: Any) -> HeadConfig:
        return parse_head_config(v)

    @model_validator(mode="before")
    @classmethod
    def _encoder_overrides(cls, v: Any) -> Any:
        """``--set encoders.image.precision=bfloat16`` tweaks the dataset's default encoders: entries without a
        ``kind`` merge onto the default for their modality, and the other default modalities are kept."""
        if not isinstance(v, dict) or not isinstance(v.get("encoders"), dict):
            return v
        enc = v["encoders"]
        if all(isinstance(e, dict) and "kind" in e or isinstance(e, EncoderConfig) for e in enc.values()):
            return v
        data = v.get("data") or {}
        dataset = data.dataset if isinstance(data, DataConfig) else data.get("dataset", "avmnist")
        defaults = DEFAULT_ENCODERS.get(dataset, {})
        merged = {m: dict(e) for m, e in defaults.items()}
        for m, e in enc.items():
            merged[m] = {**merged.get(m, {}), **e} if isinstance(e, dict) and "kind" not in e else e
        return {**v, "encoders": merged}

    @model_validator(mode="after")
    def _columns_kept(self) -> "ExperimentConfig":
        """A ``by_column`` pattern draws on a column the store keeps: one of ``data.attributes``."""
        for p in [self.train_pattern, *self.sweep.train_patterns, *self.eval.extra_patterns]:
            if p.kind == "by_column" and p.column not in self.data.attributes:
                raise ValueError(f"pattern {p.key} draws on column {p.column!r}, which data.attributes "
                                 f"{self.data.attributes} does not keep")
        return self

    @model_validator(mode="after")
    def _ray_engine_decodes_on_host(self) -> "ExperimentConfig":
        if self.store.extract_engine == "ray":
            if on_device := [m for m, e in self.encoder_configs().items() if e.decode == "device"]:
                raise ValueError(f"store.extract_engine 'ray' decodes in CPU tasks, but encoders.{on_device[0]}"
                                 ".decode is 'device'; use decode 'host' or extract_engine 'local'")
        return self

    def encoder_configs(self) -> dict[str, EncoderConfig]:
        if self.encoders is not None:
            return self.encoders
        return {m: EncoderConfig(**e) for m, e in DEFAULT_ENCODERS[self.data.dataset].items()}

    def flat(self) -> dict[str, str]:
        """Every leaf as a dotted key, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict) and v:
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
            else:
                out[prefix] = str(v)
        walk("", self.model_dump(mode="json"))
        return out
