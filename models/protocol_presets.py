"""The papers' evaluation protocols as named, versioned presets (``mm protocol <preset>``), with their published
rows. Pure data: ``runs.protocols`` turns a preset into runs and tables.

A preset fixes what its paper fixes: the protocols it runs (``runs.protocols``: a = 001 Table 1, b = 001 Table 6,
c = 004 Table VI, d = 000 Table III), what a missing rate means (``eta``; "both" = eta/2 of each modality, disjoint,
001 A4), the placeholder fed for a missing input, checkpoint selection, epochs and seeds, each with its source.
A preset never changes: a new setting is a new version (``tests/test_protocols.py`` records each preset's content
hash). Published values are in % as printed in the paper, keyed by the column header of this project's table for
that protocol (modalities ``image``, ``text``, as the ``food101`` and ``mmimdb`` adapters name them)."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Published:
    """One published row: ``method`` as the paper names it, the head of this project it is held against
    (``head``: a run label as ``runs.protocols.run_label`` gives it; None: shown without a difference), the
    table row it sits beside (``row``) and ``(column header, value %)`` pairs."""

    protocol: str
    dataset: str
    method: str
    head: str | None
    row: str
    values: tuple[tuple[str, float], ...]
    source: str


@dataclass(frozen=True)
class Preset:
    """A paper's protocol. ``selection``: "paper" = validation under the training pattern (001 A4);
    ``epochs``: None = the config's; ``fixed_epochs``: no early stopping (001 A3); ``placeholder``: the fill
    of the baselines' missing inputs ("placeholder" = the encoder's embedding of the empty input, None = the
    config's); ``heads``: the default heads (``--heads`` overrides); ``source``/``notes``: where each choice is
    stated."""

    name: str
    version: int
    source: str
    protocols: tuple[str, ...]
    eta: float
    selection: str
    epochs: int | None
    fixed_epochs: bool
    seeds: tuple[int, ...]
    placeholder: str | None
    heads: tuple[str, ...]
    notes: tuple[str, ...]
    published: tuple[Published, ...]

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    def content_hash(self) -> str:
        """sha256 of every field: an edit changes it, so it needs a new version."""
        return hashlib.sha256(repr(asdict(self)).encode()).hexdigest()  # fields in declaration order

    def published_for(self, dataset: str, protocol: str) -> list[Published]:
        return [p for p in self.published if p.dataset == dataset and p.protocol == protocol]


def _row(protocol: str, dataset: str, method: str, head: str | None, row: str, cols: list[str],
         values: list[float], source: str) -> Published:
    return Published(protocol, dataset, method, head, row, tuple(zip(cols, values)), source)


# ------------------------------------------------------------------ 001 (CMPT) Tables 1 and 6, MAP protocol
T1, T6 = "001 Table 1", "001 Table 6"
A_COLS = ["image missing", "text missing", "both missing"]  # 001: (30,100), (100,30), (65,65) % available
B_COLS = [f"test {c}" for c in A_COLS]
# 001 Table 1 columns: ViLT, MAP input, MAP attention, MSP, VisualBERT, Ma et al., Kim & Kim, MuAP head, MuAP
# cross, CMPT; kept: ViLT, MAP (input), Kim & Kim (the strongest baseline), CMPT (mean of 3 seeds)
_T1 = {"food101": {"ViLT": [76.93, 66.29, 69.03], "MAP (input)": [86.18, 74.53, 79.08],
                   "Kim & Kim": [87.11, 78.81, 82.67], "CMPT": [87.48, 80.37, 82.83]},
       "mmimdb": {"ViLT": [37.61, 34.71, 36.30], "MAP (input)": [46.30, 39.22, 42.66],
                  "Kim & Kim": [56.03, 43.21, 49.24], "CMPT": [60.21, 52.61, 54.04]}}
# 001 Table 6: train type (row) x test type, columns ViLT, MAP, MSP, Kim & Kim, CMPT; kept ViLT, MAP, Kim & Kim,
# CMPT. Paper order of test rows (30,100), (65,65), (100,30) re-ordered to A_COLS (image, text, both missing).
_T6 = {  # train type -> [test image, test text, test both missing]
    "food101": {
        "ViLT": {"image": [76.40, 41.94, 59.03], "both": [73.62, 64.25, 68.60], "text": [43.67, 66.01, 54.75]},
        "MAP": {"image": [86.34, 29.71, 57.92], "both": [85.55, 71.17, 78.49], "text": [27.46, 73.71, 50.79]},
        "Kim & Kim": {"image": [87.11, 75.41, 81.22], "both": [87.35, 78.13, 82.67], "text": [86.90, 78.81, 82.35]},
        "CMPT": {"image": [87.48, 67.60, 77.52], "both": [87.36, 78.40, 82.83], "text": [85.34, 80.37, 82.78]}},
    "mmimdb": {
        "ViLT": {"image": [37.63, 30.00, 34.47], "both": [36.48, 33.76, 36.54], "text": [27.25, 34.26, 32.51]},
        "MAP": {"image": [47.18, 24.31, 37.25], "both": [42.72, 37.80, 40.84], "text": [20.17, 36.89, 29.79]},
        "Kim & Kim": {"image": [56.03, 43.07, 49.81], "both": [55.26, 42.46, 49.24], "text": [54.67, 43.21, 49.09]},
        "CMPT": {"image": [60.21, 36.10, 50.05], "both": [57.45, 50.05, 54.04], "text": [44.72, 52.61, 49.26]}}}
OURS = {"CMPT": "cmpt", "SRMM": "srmm", "MMP": "mmp", "TBN early": "early", "TBN late": "late",
        "CLIP image only": "oracle-image", "CLIP text only": "oracle-text"}

MAP_V1 = Preset(
    name="map", version=1, source="001 §4.3 Table 1 and A4 Table 6 (MAP protocol of Lee et al. 2023), A3 Table 5",
    protocols=("a", "b"), eta=0.7, selection="paper", epochs=10, fixed_epochs=True, seeds=(0, 1, 2),
    placeholder="placeholder", heads=("cmpt", "moddrop", "early"),
    notes=("eta = 70%: a missing-image (text) type leaves 70% of the samples text (image) only; 'both' = 35% "
           "text only and 35% image only, disjoint (001 A4)",
           "train and test at the same type (a, 001 Table 1) and every train x test type (b, 001 Table 6)",
           "checkpoint selected on validation under the training pattern (001 A4); 10 epochs, no early stopping "
           "(001 §4.2, A3 Table 5: image-text datasets)",
           "three seeds (001 Tables 1 and 6: mean and SD of three runs; the seed values are not stated)",
           "a missing input is the encoder's embedding of the empty input (MAP's dummy inputs) for the baselines"),
    published=tuple(
        [_row("a", ds, m, OURS.get(m), "same", A_COLS, v, T1) for ds, rows in _T1.items() for m, v in rows.items()]
        + [_row("b", ds, m, OURS.get(m), f"{t} missing", B_COLS, v[t], T6) for ds, rows in _T6.items()
           for m, v in rows.items() for t in ("image", "text", "both")]))

# ------------------------------------------------------------------ 004 (SRMM) Tables VI and X
T6_004, TX = "004 Table VI", "004 Table X"
C_COLS = [f"text {a}%" for a in (100, 90, 70, 50, 30, 10, 0)]
_TVI = {"ViLT": [91.9, 88.2, 80.7, 73.3, 65.9, 58.4], "Ma et al.": [92.0, 90.5, 87.1, 82.6, 77.5, 73.3],
        "TBN early": [94.5, 92.7, 89.4, 85.9, 81.8, 78.7, 76.8], "TBN late": [94.2, 93.0, 88.6, 84.3, 79.9, 75.4, 73.1],
        "SRMM": [94.6, 93.2, 90.9, 88.2, 84.8, 83.3, 82.0]}
SRMM_TABLE6_V1 = Preset(
    name="srmm-table6", version=1, source="004 §V Table VI (UPMC Food-101), unimodal rows from Table X",
    protocols=("c",), eta=0.0, selection="paper", epochs=None, fixed_epochs=False, seeds=(0, 1, 2),
    placeholder=None, heads=("srmm", "early", "late", "oracle"),
    notes=("trained on complete data (004 Table VI: training image 100%, text 100%)",
           "tested with the image whole and text available in 100/90/70/50/30/10/0% of the samples (004 Table VI "
           "removes text; on audio+image data the audio, see runs.protocols.c_modality)",
           "004 states no epochs, seeds or selection: the config's epochs, three seeds, validation under the "
           "training pattern"),
    published=tuple([_row("c", "food101", m, OURS.get(m), "complete", C_COLS, v, T6_004) for m, v in _TVI.items()]
                    + [_row("c", "food101", m, OURS[m], "complete", C_COLS[:1], [v], TX)
                       for m, v in (("CLIP image only", 81.7), ("CLIP text only", 86.2))]))

# ------------------------------------------------------------------ 000 (MMP) Table III
T3 = "000 Table III"
D_COLS = ["(100,100)", "(100,30)", "(100,0)", "(65,65)", "(30,100)", "(0,100)"]  # (image %, text %) available
_TIII = {"ViLT": [92.71, 66.29, 23.70, 69.25, 76.66, 82.65],
         "Missing-aware prompts (attention)": [92.71, 72.57, 67.70, 78.09, 86.05, 85.30],
         "Missing-aware prompts (input)": [92.71, 74.53, 68.10, 79.08, 86.18, 84.80],
         "MMP": [92.87, 74.32, 66.06, 80.28, 87.71, 85.37]}
MMP_TABLE3_V1 = Preset(
    name="mmp-table3", version=1, source="000 §IV-E Table III (UPMC Food-101, ViLT backbone)",
    protocols=("d",), eta=0.0, selection="paper", epochs=None, fixed_epochs=False, seeds=(0, 1, 2),
    placeholder="placeholder", heads=("mmp", "moddrop", "early"),
    notes=("one model trained on complete data (MMP masks modalities itself: 000 §III-A), tested at (image %, "
           "text %) available = (100,100), (100,30), (100,0), (65,65), (30,100), (0,100); no sample loses both",
           "masked inputs are placeholders: zeros / empty strings (000 §III-A), here the encoder's embedding of "
           "the empty input for the baselines",
           "the prompt rows of Table III train a model per scenario (000 §IV-E); 000 states no epochs or seeds"),
    published=tuple(_row("d", "food101", m, OURS.get(m), "complete", D_COLS, v, T3) for m, v in _TIII.items()))

# ------------------------------------------------------------------ 001 (CMPT) Table 2, a whole modality missing
T2 = "001 Table 2"
# 001 Table 2, UPMC Food-101 rows (accuracy %): columns FiLM, BiGated, OGM-GE, QMF, MLA, CMPT; the rows "image
# available, text missing", "text available, image missing" and "image - text" are protocol d's (100,0), (0,100)
# and (100,100). Its CREMA-D and Kinetics-Sound rows (audio-video) have no adapter here.
_T2 = {"FiLM": [87.21, 4.68, 85.84], "BiGated": [88.87, 14.20, 85.79], "OGM-GE": [87.54, 22.35, 85.17],
       "QMF": [92.87, 45.74, 84.13], "MLA": [93.33, 69.60, 86.47], "CMPT": [94.47, 75.66, 80.66]}
CMPT_TABLE2_V1 = Preset(
    name="cmpt-table2", version=1, source="001 §4.3 Table 2 (the setup of Zhang et al. 2024), A3 Table 5",
    protocols=("d",), eta=0.0, selection="paper", epochs=10, fixed_epochs=True, seeds=(0, 1, 2),
    placeholder="placeholder", heads=("cmpt", "moddrop", "early"),
    notes=("all modalities available in training; at test one modality is missing in every sample (001 §4.3: "
           "'one modality is completely missing during inference'), and both available",
           "Table 2's columns are protocol d's (100,100), (100,0) and (0,100); d's other pairs are extra columns",
           "10 epochs, no early stopping, checkpoint on validation under the training pattern (001 A3 Table 5, A4)",
           "three seeds (001 reports CMPT's mean; Table 2 gives no SD)"),
    published=tuple(_row("d", "food101", m, OURS.get(m), "complete", ["(100,100)", "(100,0)", "(0,100)"], v, T2)
                    for m, v in _T2.items()))

PRESETS: dict[str, Preset] = {p.id: p for p in (MAP_V1, SRMM_TABLE6_V1, MMP_TABLE3_V1, CMPT_TABLE2_V1)}
PAPER_DATASETS = ("food101", "mmimdb")
