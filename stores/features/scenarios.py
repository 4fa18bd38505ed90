"""A split as a head sees it under a missing pattern: the saved presence mask (``masks``) applied batch by batch
to the split's memory-mapped features (``models.features.MaskedSplit``), each missing input replaced by its
encoder's placeholder features in the batch only, and noise added where the pattern asks for it."""
from __future__ import annotations

import torch

from models.features import MaskedSplit, Split, add_noise
from models.patterns import MissingPattern, noise_generator
from stores.features.feature_store import FeatureStore, SplitFeatures, StoreError
from stores.features.masks import MaskStore


class ScenarioReader:
    """One store's splits under missing patterns, for one seed and the feature kinds (``inputs``) a head reads.
    Each split is read once (from the decoded split cache where it holds the store's versions)."""

    def __init__(self, store: FeatureStore, inputs: tuple[str, ...], seed: int):
        self.store, self.inputs, self.seed = store, inputs, seed
        self.modalities = store.modalities
        self.masks = MaskStore(store)
        self.placeholder = store.placeholders(inputs)
        self._splits: dict[str, SplitFeatures] = {}

    def split(self, name: str) -> SplitFeatures:
        if name not in self._splits:
            self._splits[name] = self.store.read_split(name, self.inputs)
        return self._splits[name]

    def class_names(self, split: SplitFeatures, pattern: MissingPattern) -> list[str]:
        """Each row's class name, for ``pattern`` that draws per class (single-label stores only)."""
        meta = self.store.meta
        unknown = set(pattern.class_rates) - set(meta.classes)
        if meta.task == "multilabel":
            raise StoreError("a by_class missing pattern needs single-label data; this store is multi-label")
        if unknown:
            raise StoreError(f"by_class rates name classes {sorted(unknown)} this store does not have "
                             f"({', '.join(meta.classes[:10])}{' ...' if len(meta.classes) > 10 else ''})")
        return [meta.classes[int(i)] for i in split.batch.y.tolist()]

    def under(self, name: str, pattern: MissingPattern) -> Split:
        """Split ``name`` under ``pattern``: its saved presence mask (made on first use) over the split's
        features, applied to each batch as it is built (placeholders in for the missing inputs), nothing copied.
        A noise pattern is the one exception: its noise is drawn over whole tensors (the draws of earlier
        versions, so its numbers stay), so that split is materialised with the noise added."""
        split = self.split(name)
        groups = self.class_names(split, pattern) if pattern.kind == "by_class" else \
            self.store.attribute_values(name, split.ids, pattern.column) if pattern.kind == "by_column" else None
        present = self.masks.get(name, split.ids, pattern, self.seed, groups)
        masked = MaskedSplit(split.batch, torch.from_numpy(present), self.placeholder, self.modalities,
                             release=split.release)
        rng = noise_generator(pattern, name, self.seed)
        if rng is None:
            return masked
        return add_noise(masked.whole(), pattern.sigma, rng, pattern.modalities or self.modalities, pattern.sigma_scale)
