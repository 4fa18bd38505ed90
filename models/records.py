"""Typed records that cross a layer: what a store holds (``StoreMeta``), what an extraction did (``ExtractReport``,
``StoreVersion``, ``Extraction``), what a run read (``StoreInfo``), a run's results (``Scenario``, ``RunResult``),
the row every comparison table reads (``RunRow``), a logged run read back (``LoggedRun``) and what the flows return
(``SweepResult``, ``PipelineResult``, ``Evaluation``, ``Reproduction``, ``TuneResult``, ``Champion``). Plain
dataclasses, no I/O: ``from_dict`` / ``as_dict`` map them to the JSON the store, MLflow and ``--json`` already use,
so files written before these types existed still read."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .config import to_overrides
from .patterns import missing_scenario, modalities_of

COMPARE = "compare/"  # the comparison metrics' group in MLflow


def summary_metric(summary: dict[str, float]) -> str:
    """The primary metric a run was summarised on, from its ``grid_mean_<metric>`` key (``acc``, ``auroc``)."""
    return next(k.removeprefix("grid_mean_") for k in summary if k.startswith("grid_mean_"))

if TYPE_CHECKING:  # annotations only
    from .config import ExperimentConfig
    from .heads import Head
    from .patterns import MissingPattern
    from .training import FitResult


def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``d`` that ``cls`` declares (metadata files carry more: created, rows, ...)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class StoreMeta:
    """What one config's store holds at its (pinned or latest) versions: the shapes a head is built for and the
    names and versions a run logs. Saved inside ``<store name>.json`` and shipped with every registered model."""

    name: str
    dataset: str
    modalities: list[str]
    classes: list[str]
    task: str
    views: dict[str, str]
    versions: dict[str, int]
    dataset_version: str
    encoders: dict[str, dict]
    vec_dim: dict[str, int]
    tok_dim: dict[str, int]
    tok_len: dict[str, int]
    emb_dim: dict[str, int] = field(default_factory=dict)  # modalities with embedding-layer tokens only
    emb_len: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreMeta":
        return cls(**_known(cls, d))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExtractReport:
    """One extraction into the feature store: what it added, skipped, updated and removed, at which versions."""

    store: str
    fingerprint: str
    added: int  # rows new to this config's search table
    skipped: int  # rows already up to date
    rows: int
    lance_version: int  # the dataset table's version
    missing_counts: dict[str, dict[str, int]]
    seconds: float
    # inputs per second of decoding + encoding time (the ray engine: summed over its workers)
    encode_items_per_s: dict[str, float] = field(default_factory=dict)
    indices: list[str] = field(default_factory=list)
    encoded: dict[str, int] = field(default_factory=dict)  # inputs encoded per modality (0: view untouched)
    updated: int = 0  # rows whose split, label, source or content changed
    removed: int = 0  # rows no longer in the source (kept in older versions)
    versions: dict[str, int] = field(default_factory=dict)
    # seconds spent building encoders (their imports and weights): a cost of any run that encodes something,
    # independent of the row count; 0 when nothing needed encoding
    encoder_load_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StoreVersion:
    """How an extraction was versioned: the DVC hash of the store's top folder, or why DVC was not used."""

    dvc_hash: str | None = None
    data_dir: str | None = None
    dvc: str | None = None  # the reason DVC is not used (a store on object storage)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Extraction:
    """The extract flow's result: the extraction's report and, when versioned, its DVC version."""

    report: ExtractReport
    version: StoreVersion | None = None

    def as_dict(self) -> dict[str, Any]:
        """One flat document, as ``mm extract --json`` prints it."""
        return {**self.report.as_dict(), **(self.version.as_dict() if self.version else {})}


@dataclass
class StoreInfo:
    """A store as one run read it (``FeatureStore.info``): names, pinned versions, lineage tags and counts."""

    name: str
    dataset: str
    fingerprint: str
    dataset_version: str
    lance_version: int
    versions: dict[str, int]
    views: dict[str, str]
    lineage: dict[str, str]
    rows: int
    splits: dict[str, int]
    present: dict[str, int]
    indices: list[str]
    encoders: dict[str, dict]
    missing_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    updated: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Scenario:
    """One test scenario: the missing pattern applied, its slug (``image-000/audio-100``) and its metrics."""

    pattern: "MissingPattern"
    slug: str
    metrics: dict


def scenario_scalars(scenarios: list[Scenario]) -> dict[str, dict[str, float]]:
    """{slug: {metric: value}} of the scalar metrics (per-class lists and confusion matrices left out)."""
    return {s.slug: {k: v for k, v in s.metrics.items() if isinstance(v, float)} for s in scenarios}


@dataclass
class RunRow:
    """One trained run as every comparison table reads it (sweep report, ``mm compare``, benchmarks): the head
    variant, train pattern, seed, summary and the scalar metrics per scenario slug. ``run_id`` once logged."""

    variant: str
    train_pattern: str
    seed: int | str
    scenarios: dict[str, dict[str, float]]
    summary: dict[str, float]
    head: str | None = None
    seconds: float | None = None
    run_id: str | None = None

    BRIEF = ("run_id", "variant", "seed", "train_pattern", "summary", "seconds")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunRow":
        return cls(**_known(cls, d))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def brief(self) -> dict[str, Any]:
        """What ``mm train --json`` and the sweep's run list print of a run."""
        return {k: getattr(self, k) for k in self.BRIEF}


@dataclass
class RunResult:
    """A trained and evaluated head: its config, what it read, the fit, the test scenarios and their summary."""

    config: "ExperimentConfig"
    store: StoreInfo
    fit: "FitResult"
    scenarios: list[Scenario]
    summary: dict
    head: "Head"
    variant: str
    seconds: float
    mask_tables: dict = field(default_factory=dict)
    temperatures: dict[str, float] = field(default_factory=dict)  # per set of present modalities (calibration)
    calibration: dict[str, float] = field(default_factory=dict)  # ECE before / after, by split and modalities
    deviations: list[str] = field(default_factory=list)  # from the papers' values (``runs.train.run_variant``)

    def row(self, run_id: str | None = None) -> RunRow:
        """The run as the one table builder (``runs.reporting.aggregate``) reads it."""
        return RunRow(variant=self.variant, train_pattern=self.config.train_pattern.key, seed=self.config.seed,
                      scenarios=scenario_scalars(self.scenarios), summary=self.summary,
                      head=self.config.head.name, seconds=self.seconds, run_id=run_id)

    def comparison_metrics(self) -> dict[str, float]:
        """The few numbers heads are compared on, in the ``compare/`` group, the first section of MLflow's chart
        view (it sorts groups by name and puts metrics without a group last): the primary metric on complete
        data and its grid mean (``compare/complete_acc``, ``compare/grid_mean_acc``), with each modality 100%
        missing (``compare/no_<modality>_acc``) and the ECE on complete data (``compare/ece``).
        ``compare/gap_closed_<m>`` joins them once the sweep has its references
        (``stores.tracking.studies.end_sweep_run``)."""
        key = summary_metric(self.summary)
        out = {f"{COMPARE}complete_{key}": float(self.summary[f"complete_{key}"]),
               f"{COMPARE}grid_mean_{key}": float(self.summary[f"grid_mean_{key}"])}
        by_slug = {s.slug: s.metrics for s in self.scenarios}
        modalities = modalities_of([self.scenarios[0].slug])  # complete data comes first
        for m in modalities:
            if key in (gone := by_slug.get(missing_scenario(m, modalities), {})):
                out[f"{COMPARE}no_{m}_{key}"] = float(gone[key])
        if "ece" in self.scenarios[0].metrics:
            out[f"{COMPARE}ece"] = float(self.scenarios[0].metrics["ece"])
        return out

    def scalar_metrics(self) -> dict[str, float]:
        """Flat metric dict with names that sort well in the MLflow UI: the ``compare/`` group first (groups sort
        by name), then ``ece/`` (calibration), ``fit/``, ``summary/``, ``temperature/`` and ``test/...``."""
        out = self.comparison_metrics()
        out |= {f"summary/{k}": float(v) for k, v in self.summary.items()}
        for s in self.scenarios:
            for k, v in s.metrics.items():
                if isinstance(v, (int, float)):
                    out[f"test/{k}/{s.slug}"] = float(v)
        out |= self.calibration
        out |= {f"temperature/{k}": float(v) for k, v in self.temperatures.items()}
        out["fit/best_epoch"] = float(self.fit.best_epoch)
        out["fit/seconds"] = float(self.fit.seconds)
        return out


@dataclass
class TrialRecord:
    """One tuning trial: its sampled parameters, validation score and per-epoch curve."""

    number: int
    params: dict[str, Any]
    value: float | None  # best-epoch validation score; None when pruned before finishing
    state: str
    curve: dict[int, float] = field(default_factory=dict)  # epoch -> validation score
    seconds: float = 0.0


@dataclass
class TuneResult:
    """One head's equal-budget study (``mm tune``): the best parameters and every trial."""

    head: str
    best_params: dict[str, Any]
    best_value: float
    trials: list[TrialRecord]
    tree: dict  # the best trial's settings as a config tree (head + train sections)
    path: str | None = None  # the tuned YAML, once written

    @property
    def overrides(self) -> list[str]:
        """The same settings as ``--set`` arguments."""
        return to_overrides(self.tree)

    def summary(self) -> dict[str, Any]:
        """What ``mm tune --json`` prints of one head's study."""
        return {"head": self.head, "best_value": self.best_value, "best_params": self.best_params,
                "overrides": self.overrides, "path": self.path,
                "trials": [{"number": t.number, "value": t.value, "state": t.state} for t in self.trials]}


@dataclass
class Champion:
    """The registered version aliased ``champion`` for one model, and the metric that chose it."""

    model: str
    version: int
    metric: str
    value: float

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, self.metric: self.value}


@dataclass
class SweepResult:
    """A sweep: every run's row, the champions it aliased, its report and its MLflow parent run."""

    results: list[RunRow]
    champions: list[Champion]
    report: str
    run_id: str | None = None


@dataclass
class PipelineResult:
    """A pipeline: the extraction's report (with the DVC hash when versioned) and the sweep."""

    extract: Extraction
    sweep: SweepResult


@dataclass
class LoggedRun:
    """A logged run read back from tracking: its config tree (``config.yaml``), the store versions it read
    (``lineage.version.*`` tags), its metrics and tags."""

    config: dict[str, Any]
    versions: dict[str, int]
    metrics: dict[str, float]
    tags: dict[str, str]


@dataclass
class Reproduction:
    """A logged run trained again on the store versions it read: each metric beside the original."""

    run_id: str
    versions: dict[str, int]
    identical: bool
    metrics: list[dict[str, Any]]  # {metric, original, reproduced, equal}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evaluation:
    """A registered model re-evaluated on a config's scenario grid."""

    model_uri: str
    summary: dict[str, float]
    scenarios: dict[str, dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
