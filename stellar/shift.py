"""Covariate-shift weights: train for the catalogue's mix of stars, not the label survey's.

A label survey is not a random draw from the catalogue it will label: APOGEE-like
label sets favour giants and bright stars, a magnitude-limited Gaia catalogue is
half dwarfs and fainter. Where the spectrum says little (low S/N), a network's
prediction leans on the mix it was trained on, so the catalogue's kinds of star
that the label set under-represents (warm dwarfs, faint stars) come out pulled
toward the label set's dense middle. The remedy of covariate-shift learning
(Shimodaira 2000; Sugiyama et al. 2007) is to weight each training star's loss by
the density ratio p_catalogue(x) / p_labels(x) of its *observables* x, so the
weighted training set has the catalogue's mix.

The ratio is estimated by a probabilistic classifier (labelled vs catalogue)
on a few observables every star has (colours, luminosity from the parallax,
apparent magnitude, log S/N): a logistic regression on their quadratic terms,
smooth by construction, so a handful of labelled stars cannot get extreme
weights, then raised to ``power`` and capped. The estimate reads the features
table only (observables and the split column); no label and nothing about the
injected stars enters.
"""

from __future__ import annotations

import functools

import numpy as np

# The observables the ratio is a function of: indices into stellar.features.SCALAR_NAMES, plus log S/N.
# Colour (Teff and extinction), the softened log reduced parallax (luminosity: dwarf or giant), the apparent
# magnitude (how deep the label survey went); the raw parallax and its error add nothing these do not say.
SHIFT_SCALARS = ("phot_g_mean_mag", "bp_rp", "g_rp", "log_reduced_parallax")
MAX_CATALOGUE_ROWS = 200_000  # a deterministic subsample of a larger catalogue is enough for a 20-term fit
CLASSIFIER_C = 1.0  # inverse L2 strength of the logistic regression on standardised terms


def _design(scalars: np.ndarray, snr: np.ndarray, names: list[str]) -> np.ndarray:
    cols = [scalars[:, names.index(k)] for k in SHIFT_SCALARS]
    cols.append(np.log(np.clip(np.nan_to_num(snr, nan=1.0), 1.0, 1e4)))
    return np.nan_to_num(np.stack(cols, axis=1).astype(np.float64))


def _quadratic(z: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(z.shape[1])
    return np.concatenate([z, z[:, i] * z[:, j]], axis=1)


def density_ratio_weights(x_train: np.ndarray, x_catalogue: np.ndarray, power: float, cap: float) -> np.ndarray:
    """Per training star (N,), mean 1: (p_catalogue / p_train at its observables) ** power, clipped to
    [1 / cap, cap] and rescaled.

    Args:
        x_train: (N, D) observables of the training stars.
        x_catalogue: (M, D) observables of the catalogue (every star the model will label; it may include
            the training stars).
        power: 0 gives equal weights; 1 the full density ratio.
        cap: the largest weight (and 1 / cap the smallest) before rescaling.
    """
    n = len(x_train)
    if n == 0 or power <= 0 or len(x_catalogue) == 0:
        return np.ones(n)
    from sklearn.linear_model import LogisticRegression

    both = np.concatenate([x_train, x_catalogue])
    mu, sd = both.mean(axis=0), both.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    q = _quadratic((both - mu) / sd)
    qm, qs = q.mean(axis=0), q.std(axis=0)
    q = (q - qm) / np.where(qs > 0, qs, 1.0)
    y = np.r_[np.zeros(n), np.ones(len(x_catalogue))]
    # balanced classes: the fitted odds are then the density ratio itself, whatever the two sizes
    clf = LogisticRegression(C=CLASSIFIER_C, class_weight="balanced", max_iter=2000, tol=1e-8)
    clf.fit(q, y)
    log_ratio = clf.decision_function(q[:n])
    w = np.exp(np.clip(power * log_ratio, -np.log(cap), np.log(cap)))
    return w / w.mean()


def catalogue_shift_weights(features_root: str, power: float, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """(source_id (N,), weight (N,), mean 1) of the features table's training split: the density ratio of
    the whole table (every star the model will label) over the training stars, in the observables
    :data:`SHIFT_SCALARS` and log S/N (:func:`density_ratio_weights`); stars lacking one of those
    observables weigh 1 before the rescaling. Deterministic: a larger table is subsampled by a hash of
    source_id, not at random. Every member of an ensemble asks for the same weights: they are computed
    once per process and committed table version (the path names the version), and returned read-only."""
    from stellar.tables import TableStore

    return _weights_of_table(str(TableStore(features_root).table_path("features")), power, cap)


@functools.lru_cache(maxsize=4)
def _weights_of_table(path: str, power: float, cap: float) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.dataset as pads

    from stellar.features import SCALAR_NAMES

    t = pads.dataset(path, format="parquet", partitioning="hive").to_table(
        columns=["source_id", "split", "scalars", "snr"])
    ids = t.column("source_id").to_numpy(zero_copy_only=False)
    split = t.column("split").to_numpy(zero_copy_only=False)
    flat = t.column("scalars").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    scalars = flat.reshape(len(ids), -1)
    names = list(SCALAR_NAMES)
    x = _design(scalars, t.column("snr").to_numpy(zero_copy_only=False).astype(np.float64), names)
    # preprocess fills a missing value with 0: such a star has no place in the observables' space, so it
    # takes no part in the fit and keeps weight 1 (the block dropout already trains for missing inputs)
    present = np.all(scalars[:, [names.index(k) for k in SHIFT_SCALARS]] != 0.0, axis=1)
    train = (split == "train") & present
    cat = present.copy()
    if cat.sum() > MAX_CATALOGUE_ROWS:  # a fixed, order-free subsample: the ids' hash, not a random draw
        h = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
        cat &= h < np.quantile(h[cat], MAX_CATALOGUE_ROWS / cat.sum())
    order = np.argsort(ids[train], kind="stable")  # the fit must not depend on the table's row order
    cat_order = np.argsort(ids[cat], kind="stable")
    w = density_ratio_weights(x[train][order], x[cat][cat_order], power, cap)
    lacking = np.sort(ids[(split == "train") & ~present])
    sid = np.concatenate([ids[train][order], lacking])
    w = np.concatenate([w, np.ones(len(lacking))])
    w = w / w.mean()
    sid.flags.writeable = False
    w.flags.writeable = False
    return sid, w
