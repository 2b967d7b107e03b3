"""Label balancing: loss weights that flatten the training set's label density.

A survey's labelled stars are drawn from its magnitude-limited population: most
near solar metallicity, few metal-poor or hot or on the upper giant branch.
Trained on them unweighted, a network minimises its loss where the stars are,
and at low S/N (where the spectrum says little) its prediction is pulled toward
the dense peak: the edges of the label distribution are regressed to the mean,
and the metal-poor tail comes out too metal-rich by more than its errors say.

Weighting each star by a power of its inverse local label density (a k-nearest
neighbour estimate in the normalised label space) reduces that pull, with a cap so
that a handful of isolated stars do not dominate the loss. The estimate uses the
training labels only; nothing about the observed or injected stars enters.
"""

from __future__ import annotations

import numpy as np

N_NEIGHBOURS = 16


def label_density_weights(labels: np.ndarray, power: float, cap: float,
                          k: int = N_NEIGHBOURS) -> np.ndarray:
    """Per-star weights (N,), mean 1, from (N, L) normalised labels (NaN = label missing).

    Density is 1 / r_k^d with r_k the distance to the k-th nearest other star over the labels
    that at least 90 % of the stars have (a missing value counts as the mean, 0). The weight is
    (density / median density) ** -power, clipped to [1 / cap, cap], then scaled to mean 1.
    """
    y = np.asarray(labels, dtype=np.float64)
    n = len(y)
    if n == 0 or power <= 0:
        return np.ones(n)
    cols = np.isfinite(y).mean(axis=0) >= 0.9
    if not cols.any() or n <= k:
        return np.ones(n)
    x = np.nan_to_num(y[:, cols], nan=0.0)
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    dist, _ = nn.kneighbors(x)
    r = np.maximum(dist[:, -1], 1e-6)
    log_density = -x.shape[1] * np.log(r)
    w = np.exp(-power * (log_density - np.median(log_density)))
    w = np.clip(w, 1.0 / cap, cap)
    return w / w.mean()


def weight_lookup(source_id: np.ndarray, weights: np.ndarray):
    """A vectorised source_id -> weight function (1 for ids it does not know)."""
    order = np.argsort(source_id, kind="stable")
    ids, w = np.asarray(source_id)[order], np.asarray(weights, dtype=np.float32)[order]

    def of(query: np.ndarray) -> np.ndarray:
        q = np.asarray(query)
        pos = np.clip(np.searchsorted(ids, q), 0, max(len(ids) - 1, 0))
        hit = (ids[pos] == q) if len(ids) else np.zeros(len(q), bool)
        return np.where(hit, w[pos] if len(ids) else 1.0, 1.0).astype(np.float32)

    return of
