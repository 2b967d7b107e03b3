"""Turn raw feature arrays into the normalised tensors the networks take (shared by every caller)."""

from __future__ import annotations

import numpy as np
import torch

from stellar.features import Normaliser


def features_to_tensors(stats: dict, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Raw ``spectrum``, ``spectrum_mask``, ``xp``, ``scalars`` -> the tensors of FeatureDataset batches."""
    xp = Normaliser.from_stats(stats["xp"]).normalise(np.asarray(arrays["xp"], dtype=np.float64))
    sc = Normaliser.from_stats(stats["scalars"]).normalise(np.asarray(arrays["scalars"], dtype=np.float64))
    n = len(xp)
    return {
        "spectrum": torch.from_numpy(np.ascontiguousarray(arrays["spectrum"], dtype=np.float32)),
        "spectrum_mask": torch.from_numpy(np.ascontiguousarray(arrays["spectrum_mask"]).astype(bool)),
        "xp": torch.from_numpy(xp),
        "scalars": torch.from_numpy(sc),
        "source_id": torch.from_numpy(np.asarray(arrays.get("source_id", np.arange(n)), dtype=np.int64)),
    }
