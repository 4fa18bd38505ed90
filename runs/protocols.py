"""The papers' evaluation protocols as runs and tables, without Prefect: used by ``bench/protocols.py`` (its own
run log) and by ``mm protocol <preset>`` (``tasks.protocols``, the sweep machinery).

  a  001 Table 1: missing-aware-prompts protocol, the same missing type (each modality, both) at train and test,
     eta = 70%
  b  001 Table 6: 3 x 3 grid of train type x test type at eta = 70%
  c  004 Table VI: trained complete, the modality 004 removes (text; audio for audio+image: ``c_modality``)
     available at 100/90/70/50/30/10/0% at test
  d  000 Table III: one model trained complete, tested at (first %, second %) available = (100,100), (100,30),
     (100,0), (65,65), (30,100), (0,100)

Checkpoints are selected as the papers do (``selection="paper"``: validation under the training pattern, 001 A4);
every value that differs from a paper's is named in the run's label (``models.paper.deviations``). A preset
(``models.protocol_presets``) fixes the protocols, eta, selection, epochs, seeds and placeholder; ``preset_runs``
gives its runs, ``preset_report`` its tables with the paper's published rows beside them on the paper's dataset."""
from __future__ import annotations

import json

import numpy as np

from models.config import ConfigError, ExperimentConfig
from models.head_configs import HEAD_CONFIGS, HeadConfig
from models.heads import parse_head_config
from models.paper import PAPER, paper_head
from models.patterns import MissingPattern, robustness_grid, scenario_slug
from models.protocol_presets import PAPER_DATASETS, PRESETS, Preset, Published
from models.records import RunRow
from runs.gap import add_gap_closed
from runs.tune import tuned_path
from stores.config_files import load_tuned, with_tree

ROBUST, BASELINES = ("mmp", "cmpt", "srmm"), ("early", "late", "moddrop")
HEADS = ["early", "late", "moddrop", "srmm", "mmp", "cmpt", "cmpt-block", "oracle"]
PROTOCOLS = ["a", "b", "c", "d"]
ETA = 0.7
C_AVAILABLE = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]  # protocol c
PAIRS_AVAILABLE = [(1.0, 1.0), (1.0, 0.3), (1.0, 0.0), (0.65, 0.65), (0.3, 1.0), (0.0, 1.0)]  # protocol d
C_REMOVE = ["paper", "other", "both"]
SELECTION = {"paper": "train_pattern", "robust": "robust"}  # --selection -> eval.select_on


# ---------------------------------------------------------------------- pattern builders
def map_types(modalities: list[str]) -> list[str]:
    return [*modalities, "both"]


def map_pattern(mp_type: str, eta: float = ETA) -> MissingPattern:
    return MissingPattern(kind="map", mp_type=mp_type, eta=eta)


def available(fractions: dict[str, float]) -> MissingPattern:
    """The pattern where modality m is available in exactly fractions[m] of the rows (no row loses all)."""
    rates = {m: round(1.0 - a, 6) for m, a in fractions.items() if a < 1.0}
    return MissingPattern(kind="per_modality", rates=rates) if rates else MissingPattern(kind="complete")


def c_modality(modalities: list[str]) -> str:
    """The modality protocol c removes, as 004 Table VI does: text (the stronger modality on Food-101, 004
    Table X: text 86.2 vs image 81.7), the image staying whole. 004 has no audio; for audio+image (AV-MNIST) it is
    the audio, by analogy on both counts: the non-visual modality, and the stronger one there (unimodal oracles
    99.3 audio vs 94.6 image, README). Otherwise the last modality."""
    return next((m for m in ("text", "audio") if m in modalities), modalities[-1])


def c_modalities(modalities: list[str], choice: str = "paper") -> list[str]:
    """Protocol c's removed modalities for ``--c-remove``: "paper" (``c_modality``), "other" (the labelled
    extra: the modality 004 keeps whole) or "both"."""
    paper = c_modality(modalities)
    other = [m for m in modalities if m != paper][:1]
    return {"paper": [paper], "other": other, "both": [paper, *other]}[choice]


def protocol_patterns(protocol: str, modalities: list[str], c_removed: list[str] | None = None, eta: float = ETA
                      ) -> list[tuple[MissingPattern, list[MissingPattern]]]:
    """(train pattern, test patterns) pairs of one protocol; ``c_removed``: protocol c's removed modalities
    (default: the paper's, ``c_modality``); ``eta``: the MAP missing rate of a and b."""
    types = map_types(modalities)
    if protocol == "a":
        return [(map_pattern(t, eta), [map_pattern(t, eta)]) for t in types]
    if protocol == "b":
        return [(map_pattern(t, eta), [map_pattern(u, eta) for u in types]) for t in types]
    if protocol == "c":
        removed = c_removed or [c_modality(modalities)]
        return [(MissingPattern(), [available({m: a}) for m in removed for a in C_AVAILABLE])]
    if protocol == "d":
        first, second = modalities[:2]
        return [(MissingPattern(), [available({first: a, second: b}) for a, b in PAIRS_AVAILABLE])]
    raise ValueError(f"unknown protocol {protocol!r}; have {PROTOCOLS}")


def training_plan(protocols: list[str], modalities: list[str], c_removed: list[str] | None = None,
                  eta: float = ETA) -> dict[str, tuple[MissingPattern, list]]:
    """Train pattern key -> (train pattern, union of the test patterns the protocols need from it)."""
    plan: dict[str, tuple[MissingPattern, list[MissingPattern]]] = {}
    for p in protocols:
        for train, tests in protocol_patterns(p, modalities, c_removed, eta):
            have = plan.setdefault(train.key, (train, []))[1]
            have += [t for t in tests if t not in have]
    return plan


# ---------------------------------------------------------------------- runs
def head_specs(heads: list[str], modalities: list[str], with_blocks: list[str] = ()) -> list[dict]:
    """Head configs; ``oracle`` expands to one oracle per modality, ``oracle-lora`` to one LoRA oracle per
    modality whose encoder has transformer blocks (``with_blocks``: the store's embedding-layer tokens), and
    ``<baseline>-lora`` to that baseline over LoRA streams and ``mmp-lora`` to MMP through the encoder (000
    §III-B as written), none where no encoder has blocks; ``cmpt-block`` to CMPT with every stream a trainable
    block, the ablation beside CMPT's own path (``cmpt``: the encoder's blocks with LoRA wherever it has them, 001
    §3), none where no encoder has blocks (``cmpt`` is then that variant already)."""
    expand = {"oracle": [{"name": "oracle", "modality": m} for m in modalities],
              "oracle-lora": [{"name": "oracle", "modality": m, "backbone": "encoder+lora"} for m in with_blocks],
              "cmpt-block": [{"name": "cmpt", "backbone": "trainable_block"}] if with_blocks else [],
              **{f"{b}-lora": [{"name": b, "backbone": "encoder+lora"}] if with_blocks else []
                 for b in (*BASELINES, "mmp")}}
    return [h for name in heads for h in expand.get(name, [{"name": name}])]


def head_config(head: dict, modalities: list[str]) -> HeadConfig:
    """A head spec's config: ``{"name": n, "paper": True}`` is head n with its paper's constants."""
    return paper_head(head["name"], modalities) if head.get("paper") else parse_head_config(head)


def spec_label(head: dict) -> str:
    """A head spec's short name: its config's label, ``-paper`` for a paper-constants row."""
    return parse_head_config({k: v for k, v in head.items() if k != "paper"}).label + \
        ("-paper" if head.get("paper") else "")


def with_head(base: ExperimentConfig, head: dict) -> ExperimentConfig:
    return base.model_copy(update={"head": head_config(head, list(base.encoder_configs()))})


def tuned_applies(base: ExperimentConfig, head: dict, tuned: bool) -> bool:
    """Whether ``--tuned`` gives this head a configs/tuned/ file (an oracle's names its modality); never to a
    paper-constants row."""
    return tuned and not head.get("paper") and tuned_path(with_head(base, head), head["name"]).exists()


def with_paper_rows(base: ExperimentConfig, heads: list[dict], tuned: bool) -> list[dict]:
    """``heads`` with a paper-constants row after each head a paper states values for (pooled or token inputs
    as the head's default, not the LoRA baselines), unless the row's own config already has them."""
    out = []
    for h in heads:
        out.append(h)
        paper = {"name": h["name"], "paper": True}
        if set(h) == {"name"} and h["name"] in PAPER and trained_as(base, paper, False) != trained_as(base, h, tuned):
            out.append(paper)
    return out


def trained_as(base: ExperimentConfig, head: dict, tuned: bool) -> tuple:
    """What decides a head's training besides the pattern and seed: its config and training recipe."""
    cfg = run_config(base, head, MissingPattern(), [], 0, tuned, None)
    return cfg.head, cfg.train


def key_head(head: dict, modalities: list[str]) -> dict:
    """The head as a run key holds it: a paper-constants row by its values, so a change of PAPER retrains it."""
    return {**head_config(head, modalities).model_dump(), "paper": True} if head.get("paper") else head


def run_config(base: ExperimentConfig, head: dict, train: MissingPattern, tests: list[MissingPattern], seed: int,
               tuned: bool, epochs: int | None, selection: str = "paper") -> ExperimentConfig:
    """One protocol run's config: checkpoints selected as ``selection`` says (``SELECTION``), marked a paper
    protocol run so that a non-paper selection is named in its deviations (``models.paper``)."""
    cfg = with_head(base, head)
    if tuned_applies(base, head, tuned):
        cfg = with_tree(cfg, load_tuned(tuned_path(cfg, head["name"])))
    # the config's grid (complete, each modality missing at every test rate: the grid mean of the verdict and the
    # gap_closed references at 100%) plus the protocol's other patterns as extras
    grid = robustness_grid(list(cfg.encoder_configs()), cfg.eval.test_rates)
    over = {"seed": seed, "train_pattern": train.model_dump(),
            "eval": {"extra_patterns": [t.model_dump() for t in tests if t not in grid],
                     "select_on": SELECTION[selection], "paper_protocol": True}}
    if epochs:
        over["train"] = {"epochs": epochs}
    return with_tree(cfg, over)


def run_key(head: dict, train: MissingPattern, seed: int, epochs: int | None, tuned: bool,
            selection: str = "paper") -> str:
    """``tuned``: whether a tuned config was applied to this head (not whether --tuned was given), so a head
    with no configs/tuned/ file shares its default-config runs between the two reports."""
    return json.dumps([head, train.key, seed, epochs, tuned, selection], sort_keys=True)


# ---------------------------------------------------------------------- tables
def cell(vals: list[float]) -> tuple[float, float] | None:
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def fmt(v) -> str:
    return "" if v is None else f"{v[0] * 100:.1f} ± {v[1] * 100:.1f}"


def table(results: list[dict], rows: list[tuple[str, str]], cols: list[tuple[str, str]], metric: str = "acc",
          extra: dict[str, dict[str, tuple]] | None = None) -> tuple[str, dict[str, float]]:
    """Markdown table; ``rows``: (label, train pattern key) per row, variant from the label's runs; ``cols``:
    (header, scenario slug). Returns the text and the means as flat metrics."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    extra = extra or {}
    ex_cols = sorted({c for v in extra.values() for c in v})
    lines = ["| head | train | " + " | ".join(h for h, _ in cols + [(c, c) for c in ex_cols]) + " | seeds |",
             "|" + "---|" * (len(cols) + len(ex_cols) + 3)]
    flat = {}
    for variant in variants:
        for label, train in rows:
            runs = [r for r in results if r["variant"] == variant and r["train_pattern"] == train]
            if not runs:
                continue
            cells = [cell([r["scenarios"][s][metric] for r in runs if s in r["scenarios"]]) for _, s in cols]
            cells += [extra.get(f"{variant}|{train}", {}).get(c) for c in ex_cols]
            for (h, _), c in zip(cols, cells):
                if c is not None:
                    flat[f"{variant}/{label}/{h}"] = c[0]
            lines.append(f"| {row_name(runs[0])} | {label} | " + " | ".join(map(fmt, cells))
                         + f" | {len({r['seed'] for r in runs})} |")
    return "\n".join(lines), flat


def row_name(r: dict) -> str:
    """A table's head cell: the run's variant (its deviations named), marked when it is a paper-constants row."""
    return ("paper constants: " if json.loads(r["key"])[0].get("paper") else "") + r["variant"]


def c_title(removed: str, mods: list[str]) -> str:
    """Protocol c's title for the table that removes ``removed``: the paper's direction or the labelled extra."""
    paper = c_modality(mods)
    why = ("as 004 Table VI removes text" if removed == "text" else f"004 removes text; {removed} by analogy: the "
           "non-visual modality (c_modality)") if removed == paper else \
        f"EXTRA, not 004's direction: protocol c removes {paper} (c_modality)"
    return (f"c{'' if removed == paper else '-other'}) 004 Table VI: trained complete, {removed} available at test "
            f"({why}); gap_closed_<m> at 100% m missing (0 = zero-fill early, 100 = oracle of the other modality)")


def protocol_table(protocol: str, results: list[dict], mods: list[str], removed: str | None = None,
                   eta: float = ETA, metric: str = "acc") -> tuple[str, str, dict]:
    """(title, Markdown table, flat metrics) of one protocol; ``removed``: protocol c's removed modality
    (default: the paper's, ``c_modality``); ``metric``: the scenario metric shown (MM-IMDb: f1_macro)."""
    types = map_types(mods)
    if protocol in ("a", "b"):
        pct = f"eta = {round(eta * 100)}%"
        title = (f"a) 001 Table 1: same missing type at train and test, {pct} (column: the missing type)"
                 if protocol == "a" else f"b) 001 Table 6: train type (row) x test type (column), {pct}")
        if protocol == "a":  # one row per head: the diagonal of b
            diag = [{**r, "train_pattern": "map[same]", "scenarios": {f"same-{t}": r["scenarios"][
                scenario_slug(map_pattern(t, eta), mods)]}} for t in types for r in results
                if r["train_pattern"] == map_pattern(t, eta).key]
            text, flat = table(diag, [("same", "map[same]")], [(f"{t} missing", f"same-{t}") for t in types], metric)
        else:
            text, flat = table(results, [(f"{t} missing", map_pattern(t, eta).key) for t in types],
                               [(f"test {u} missing", scenario_slug(map_pattern(u, eta), mods)) for u in types], metric)
        return title, text, flat
    if protocol == "c":
        complete = [r for r in results if r["train_pattern"] == "complete"]
        # the rows share their summary dicts with ``complete``: the gaps land in both
        gaps = add_gap_closed([RunRow.from_dict(r) for r in complete], metric, mods)
        extra = {f"{v}|complete": {g: cell([r["summary"][g] for r in complete if r["variant"] == v
                                            and g in r["summary"]]) for g in gaps}
                 for v in {r["variant"] for r in complete}}
        removed = removed or c_modality(mods)
        text, flat = table(complete, [("complete", "complete")],
                           [(f"{removed} {round(a * 100)}%", scenario_slug(available({removed: a}), mods))
                            for a in C_AVAILABLE], metric, extra=extra)
        return c_title(removed, mods), text, flat
    first, second = mods[:2]
    text, flat = table([r for r in results if r["train_pattern"] == "complete"], [("complete", "complete")],
                       [(f"({round(a * 100)},{round(b * 100)})", scenario_slug(available({first: a, second: b}), mods))
                        for a, b in PAIRS_AVAILABLE], metric)
    return (f"d) 000 Table III: one model trained complete, tested at ({first} %, {second} %) available", text, flat)


LORA_BASELINES = tuple(f"{b}-lora" for b in BASELINES)  # reported beside the bar, not part of it
# each head, then its paper-constants row (models.paper), which is held to the same bar
VERDICT_HEADS = tuple(x for h in ROBUST + BASELINES for x in (h, f"{h}-paper")) + LORA_BASELINES


def run_label(r: dict) -> str:
    """A run's head as its config labels it (from the head config in its run key): a baseline over LoRA streams
    is ``<name>-lora``, not ``<name>``; a paper-constants row ``<name>-paper``."""
    return spec_label(json.loads(r["key"])[0])


def verdict_table(results: list[dict]) -> tuple[str, dict[str, float]]:
    """Issue 9's bar on the complete-trained runs: each robust head within 0.5 point of the best baseline on
    complete data, and at least modality dropout's grid mean. Differences are of means over seeds, with 2
    standard errors of the difference; a shortfall smaller than that is reported as a tie, not a loss. The bar is
    against the papers' baselines on pooled vectors (their default or tuned rows); baselines over LoRA streams are
    listed below them, paper-constants rows beside their heads."""
    heads = VERDICT_HEADS
    runs = [r for r in results if r["train_pattern"] == "complete" and run_label(r) in heads]
    by_head = {run_label(r): row_name(r) for r in runs}
    vals = {(h, k): 100 * np.array([r["summary"][k] for r in runs if run_label(r) == h])
            for h in by_head for k in ("complete_acc", "grid_mean_acc")}
    if "moddrop" not in by_head:
        return "(needs the baselines' complete-trained runs)", {}
    best = max((h for h in BASELINES if h in by_head), key=lambda h: vals[h, "complete_acc"].mean())

    def diff(h: str, ref: str, k: str) -> tuple[float, float]:
        a, b = vals[h, k], vals[ref, k]
        var = sum(x.var(ddof=1) / len(x) for x in (a, b) if len(x) > 1)
        return a.mean() - b.mean(), 2 * var ** 0.5

    lines = ["| head | complete | grid mean | complete - best baseline (± 2 se) | grid mean - moddrop (± 2 se) "
             "| meets the bar | seeds |", "|---|---|---|---|---|---|---|"]
    flat = {}
    for h in [h for h in heads if h in by_head]:
        (dc, sc), (dg, sg) = diff(h, best, "complete_acc"), diff(h, "moddrop", "grid_mean_acc")
        short = [x for x in ((-0.5 - dc, sc), (-dg, sg)) if x[0] > 0]  # (shortfall, its 2 se)
        ok = "" if h.removesuffix("-paper") not in ROBUST else "yes" if not short else \
            "tie (within 2 se)" if all(gap <= se for gap, se in short) else "no"
        c, g = vals[h, "complete_acc"], vals[h, "grid_mean_acc"]
        flat.update({f"verdict/{h}/complete": c.mean(), f"verdict/{h}/grid_mean": g.mean()})
        cells = [cell(list(c / 100)), cell(list(g / 100))]
        lines.append(f"| {by_head[h]} | {fmt(cells[0])} | {fmt(cells[1])} | {dc:+.1f} ± {sc:.1f} | "
                     f"{dg:+.1f} ± {sg:.1f} | {ok} | {len(c)} |")
    return f"best baseline on complete data: {best}\n\n" + "\n".join(lines), flat




# ---------------------------------------------------------------------- presets (mm protocol)
def get_preset(name: str) -> Preset:
    """A preset by id (``map-v1``); an unknown one is one ConfigError line naming the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown protocol preset {name!r}; have {', '.join(PRESETS)}")
    return PRESETS[name]


def with_fill(head: dict, fill: str | None) -> dict:
    """``head`` with the preset's placeholder where its config has a ``fill`` (the baselines), not a
    paper-constants row."""
    use = fill and not head.get("paper") and "fill" in HEAD_CONFIGS[head["name"]].model_fields
    return {**head, "fill": fill} if use else head


def preset_runs(p: Preset, base: ExperimentConfig, mods: list[str], with_blocks: list[str],
                heads: list[str] | None = None, seeds: list[int] | None = None, epochs: int | None = None,
                paper_rows: bool = True) -> list[tuple[str, ExperimentConfig]]:
    """(run key, config) of every run of preset ``p``: each head (``heads`` or the preset's; with a
    paper-constants row where ``models.paper`` states values) x training pattern x seed. ``epochs`` overrides the
    preset's; with ``fixed_epochs`` no run stops early (001 A3)."""
    specs = head_specs(list(heads or p.heads), mods, with_blocks)
    specs = [with_fill(h, p.placeholder) for h in (with_paper_rows(base, specs, False) if paper_rows else specs)]
    plan = training_plan(list(p.protocols), mods, eta=p.eta)
    epochs = epochs or p.epochs
    out = []
    for head in specs:
        for train, tests in plan.values():
            for seed in seeds or p.seeds:
                cfg = run_config(base, head, train, tests, seed, False, epochs, p.selection)
                if p.fixed_epochs:
                    cfg = with_tree(cfg, {"train": {"patience": cfg.train.epochs}})
                out.append((run_key(key_head(head, mods), train, seed, epochs, False, p.selection), cfg))
    return out


def result_rows(keys: list[str], rows: list[RunRow]) -> list[dict]:
    """The table builders' rows: each run's row with its run key (what ``row_name`` and ``run_label`` read)."""
    return [{**r.as_dict(), "key": k} for k, r in zip(keys, rows)]


def published_cell(v: float | None) -> str:
    """A published value as the paper prints it (92.87, 94.6)."""
    return "" if v is None else f"{v:g}"


def join_published(text: str, flat: dict[str, float], results: list[dict], published: list[Published]
                   ) -> tuple[str, list[dict]]:
    """``text`` (a ``table`` of this project's runs) with each published row below it, and, for a published row
    held against a head (``Published.head``), one row per variant of that head: ours minus published, in points.
    Returns the text and the rows as records."""
    lines = text.splitlines()
    headers = [h.strip() for h in lines[0].strip().strip("|").split("|")][2:-1]
    labels = {}  # run label (``cmpt``, ``oracle-image``) -> its variants, in table order
    for r in results:
        labels.setdefault(run_label(r), []).append(r["variant"])
    records = []
    for pub in published:
        vals = dict(pub.values)
        lines.append(f"| published: {pub.method} ({pub.source}) | {pub.row} | "
                     + " | ".join(published_cell(vals.get(h)) for h in headers) + " |  |")
        record = {"method": pub.method, "source": pub.source, "row": pub.row, "values": vals, "vs": {}}
        for variant in dict.fromkeys(labels.get(pub.head, [])):
            diff = {h: 100 * flat[f"{variant}/{pub.row}/{h}"] - v for h, v in vals.items()
                    if f"{variant}/{pub.row}/{h}" in flat}
            if diff:
                record["vs"][variant] = diff
                lines.append(f"| ours - published: {variant} - {pub.method} | {pub.row} | "
                             + " | ".join(f"{diff[h]:+.1f}" if h in diff else "" for h in headers) + " |  |")
        records.append(record)
    return "\n".join(lines), records


def preset_report(p: Preset, results: list[dict], mods: list[str], dataset: str, metric: str = "acc") -> dict:
    """Preset ``p``'s tables (the protocol tables of ``protocol_table``), each with the paper's published rows
    and our differences when ``dataset`` (``data.dataset``) is one the paper reports on."""
    sections = []
    for protocol in p.protocols:
        title, text, flat = protocol_table(protocol, [dict(r) for r in results], mods, eta=p.eta, metric=metric)
        published = p.published_for(dataset, protocol)
        text, records = join_published(text, flat, results, published) if published else (text, [])
        sections.append({"protocol": protocol, "title": title, "table": text, "metrics": flat,
                         "published": records})
    applies = any(s["published"] for s in sections)
    note = (f"published rows: {', '.join(sorted({r['source'] for s in sections for r in s['published']}))} "
            f"({dataset}); ours - published in points" if applies else
            f"no published rows apply: data.dataset is {dataset!r}; {p.id}'s published rows are on "
            f"{', '.join(sorted({q.dataset for q in p.published}))} (paper datasets: {', '.join(PAPER_DATASETS)})")
    return {"preset": p.id, "source": p.source, "notes": list(p.notes), "metric": metric, "dataset": dataset,
            "published_apply": applies, "note": note, "sections": sections}
