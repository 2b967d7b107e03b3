"""Pure, vectorised feature math: spectra masks and rebinning, XP scaling, scalars, splits, stats.

Everything works on whole batches (numpy arrays of shape (n_stars, ...));
there is no loop over stars or pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Quality bits of the ``quality`` column (a star is never dropped; these say what it lacks).
Q_NO_XP = 1 << 0
Q_NO_BP = 1 << 1
Q_NO_RP = 1 << 2
Q_NO_ASTROMETRY = 1 << 3
Q_NO_PARALLAX = 1 << 4
Q_NEGATIVE_PARALLAX = 1 << 5
Q_NO_PHOTOMETRY = 1 << 6
Q_LOW_SNR = 1 << 7
Q_MANY_MASKED = 1 << 8
Q_EDGE_SPIKE = 1 << 9
QUALITY_BITS = {
    "no_xp": Q_NO_XP, "no_bp": Q_NO_BP, "no_rp": Q_NO_RP, "no_astrometry": Q_NO_ASTROMETRY,
    "no_parallax": Q_NO_PARALLAX, "negative_parallax": Q_NEGATIVE_PARALLAX, "no_photometry": Q_NO_PHOTOMETRY,
    "low_snr": Q_LOW_SNR, "many_masked": Q_MANY_MASKED, "edge_spike": Q_EDGE_SPIKE,
}
SCALAR_NAMES = ("phot_g_mean_mag", "bp_rp", "g_rp", "parallax", "parallax_error", "reduced_parallax",
                "log_reduced_parallax")
FILL_FLUX = 1.0  # masked pixels read as continuum; the mask says they are not data


@dataclass(frozen=True)
class SpectrumResult:
    """What :func:`process_spectra` returns: rebinned flux, error and mask, and per star the S/N, the
    masked output pixels and whether an edge spike was masked."""

    flux: np.ndarray  # (n, m) float32, masked pixels = FILL_FLUX
    error: np.ndarray  # (n, m) float32, masked pixels = 0
    mask: np.ndarray  # (n, m) uint8, 1 = not data
    snr: np.ndarray  # (n,) median flux/error over unmasked input pixels
    n_masked: np.ndarray  # (n,) masked output pixels
    spike: np.ndarray  # (n,) bool, an edge spike was masked


def mask_pixels(flux: np.ndarray, error: np.ndarray, edge_pixels: int, spike_excess: float,
                spike_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Bad-pixel mask (NaN/inf flux or error, non-positive error, edge spikes) and a spike flag."""
    bad = ~np.isfinite(flux) | ~np.isfinite(error) | (error <= 0)
    spike = np.zeros(flux.shape[0], dtype=bool)
    if edge_pixels > 0:
        n = flux.shape[1]
        edge = np.zeros(n, dtype=bool)
        edge[:edge_pixels] = True
        edge[max(0, n - edge_pixels):] = True
        with np.errstate(invalid="ignore"):
            high = (flux > 1.0 + spike_excess) & (flux - 1.0 > spike_sigma * np.abs(error))
        spikes = high & edge[None, :]
        spike = spikes.any(axis=1)
        bad |= spikes
    return bad, spike


def rebin(values: np.ndarray, weights_ok: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each run of ``factor`` pixels over the unmasked ones; trailing pixels that do not
    fill a bin are dropped (2401 -> 800 for factor 3). Returns (binned, n_good per bin)."""
    if factor == 1:
        return np.where(weights_ok, values, 0.0), weights_ok.astype(np.int32)
    n, m = values.shape
    nb = m // factor
    v = np.where(weights_ok, values, 0.0)[:, : nb * factor].reshape(n, nb, factor)
    w = weights_ok[:, : nb * factor].reshape(n, nb, factor)
    count = w.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = v.sum(axis=2) / count
    return mean, count


def process_spectra(flux: np.ndarray, error: np.ndarray, factor: int, edge_pixels: int,
                    spike_excess: float, spike_sigma: float) -> SpectrumResult:
    """Mask bad pixels and edge spikes, measure each star's S/N and rebin flux and error by ``factor``.

    The S/N is the median flux/error over the unmasked input pixels; a bin's error is that of the mean
    of its good pixels, and a bin with none is masked (flux FILL_FLUX, error 0)."""
    flux = flux.astype(np.float64)
    error = error.astype(np.float64)
    bad, spike = mask_pixels(flux, error, edge_pixels, spike_excess, spike_sigma)
    ok = ~bad
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(ok, flux / error, np.nan)
    snr = np.nanmedian(ratio, axis=1) if ratio.size else np.zeros(flux.shape[0])
    f, count = rebin(flux, ok, factor)
    e2, _ = rebin(error**2, ok, factor)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.sqrt(e2 / np.maximum(count, 1))  # error of the mean of `count` pixels
    mask = count == 0
    f = np.where(mask, FILL_FLUX, f).astype(np.float32)
    e = np.where(mask, 0.0, e).astype(np.float32)
    return SpectrumResult(f, e, mask.astype(np.uint8), np.nan_to_num(snr, nan=0.0).astype(np.float32),
                          mask.sum(axis=1).astype(np.int16), spike)


def scale_xp(bp: np.ndarray, rp: np.ndarray, n_relevant_bp: np.ndarray, n_relevant_rp: np.ndarray,
             g_flux: np.ndarray, how: str, truncate: bool, n_bases: int) -> np.ndarray:
    """(n, 2*n_bases) float32: BP then RP coefficients, scaled and optionally truncated.

    Missing bands (rows of NaN) become zeros; the quality bits say so.
    """
    out = []
    for coeff, n_rel in ((bp, n_relevant_bp), (rp, n_relevant_rp)):
        c = coeff[:, :n_bases].astype(np.float64)
        if truncate:
            idx = np.arange(n_bases)[None, :]
            c = np.where(idx < np.nan_to_num(n_rel, nan=n_bases)[:, None], c, 0.0)
        if how == "g_flux":
            scale = g_flux[:, None]
        elif how == "first_coefficient":
            scale = coeff[:, :1]
        else:
            scale = np.ones((c.shape[0], 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            c = c / scale
        out.append(np.where(np.isfinite(c), c, 0.0))
    return np.concatenate(out, axis=1).astype(np.float32)


def scalar_features(g: np.ndarray, bp: np.ndarray, rp: np.ndarray, parallax: np.ndarray,
                    parallax_error: np.ndarray) -> np.ndarray:
    """(n, len(SCALAR_NAMES)) float32; missing values become 0 (quality bits flag them).

    ``reduced_parallax`` = parallax * 10**(0.2 G) / 100 grows with luminosity**-1/2 and,
    unlike an absolute magnitude, stays finite for zero and negative parallaxes.
    ``log_reduced_parallax``: its softened log10, log10((x + sqrt(x^2 + 4 e^2)) / 2) with e the
    reduced parallax's error: log10(x) (= -0.2 M_G + const, the luminosity scale on which log g is
    linear) where the parallax is significant, and a finite value that shrinks with x / e where it is
    not. A standardised linear reduced parallax squeezes every giant into a few hundredths of a unit
    beside the dwarfs; the log spreads them as an absolute magnitude does.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        scale = 10 ** (0.2 * g) / 100.0
        x, e = parallax * scale, np.abs(parallax_error) * scale
        log_x = np.log10((x + np.sqrt(x * x + 4.0 * e * e)) / 2.0)
        cols = [g, bp - rp, g - rp, parallax, parallax_error, x, log_x]
    x = np.stack(cols, axis=1)
    return np.where(np.isfinite(x), x, 0.0).astype(np.float32)


# The preprocess settings the features depend on: stored with the features' statistics (and so with
# every model trained on them), so the model alone can rebuild its inputs from archive arrays.
FEATURE_SETTINGS = ("rebin", "edge_pixels", "spike_excess", "spike_sigma", "max_masked_fraction", "low_snr",
                    "xp_scale", "xp_truncate", "xp_bases")
G_FLUX_ZERO_POINT = 25.6874  # Gaia DR3 G-band zero point (mag): the G flux of a star whose flux is not given


# Gaia archive column -> RawStars field: the inputs beside the spectrum a model reads (all optional)
SCALAR_INPUTS = {
    "bp_n_relevant_bases": "bp_n_relevant", "rp_n_relevant_bases": "rp_n_relevant",
    "phot_g_mean_mag": "g", "phot_g_mean_flux": "g_flux", "phot_bp_mean_mag": "bp_mag",
    "phot_rp_mean_mag": "rp_mag", "parallax": "parallax", "parallax_error": "parallax_error",
    "rvs_spec_sig_to_noise": "snr",
}


@dataclass(frozen=True)
class RawStars:
    """A batch of stars as the Gaia archive gives them, NaN where a value is missing.

    ``flux``/``flux_error`` (n, pixels) on the instrument grid; ``bp``/``rp`` (n, 55) coefficients
    (rows of NaN: no band); the rest (n,). ``has_xp`` / ``has_astrometry``: whether the star has an
    XP row / an astrometry row at all (a join found one), which the quality bits tell apart from a
    row whose values are missing."""

    flux: np.ndarray
    flux_error: np.ndarray
    bp: np.ndarray
    rp: np.ndarray
    bp_n_relevant: np.ndarray
    rp_n_relevant: np.ndarray
    g: np.ndarray
    g_flux: np.ndarray
    bp_mag: np.ndarray
    rp_mag: np.ndarray
    parallax: np.ndarray
    parallax_error: np.ndarray
    snr: np.ndarray  # the archive's rvs_spec_sig_to_noise (NaN: measure it from the spectrum)
    has_xp: np.ndarray
    has_astrometry: np.ndarray


def star_features(raw: RawStars, settings: dict) -> dict[str, np.ndarray]:
    """The model's inputs of a batch of stars: the one feature computation of the preprocess stage and
    of a model applied to archive arrays (``stellar.api``), so both give the same numbers.

    ``settings``: the FEATURE_SETTINGS (a PreprocessConfig's values). Returns ``spectrum``,
    ``spectrum_error``, ``spectrum_mask``, ``xp``, ``scalars``, ``snr``, ``n_masked`` and ``quality``.
    Per star, never per batch: a star's features do not depend on the other stars in the batch."""
    spec = process_spectra(raw.flux, raw.flux_error, settings["rebin"], settings["edge_pixels"],
                           settings["spike_excess"], settings["spike_sigma"])
    g = np.asarray(raw.g, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        g_flux = np.where(np.isfinite(raw.g_flux), raw.g_flux, 10 ** (-0.4 * (g - G_FLUX_ZERO_POINT)))
    xp = scale_xp(raw.bp, raw.rp, raw.bp_n_relevant, raw.rp_n_relevant, g_flux, settings["xp_scale"],
                  settings["xp_truncate"], settings["xp_bases"])
    scalars = scalar_features(g, raw.bp_mag, raw.rp_mag, raw.parallax, raw.parallax_error)
    snr_gaia = np.asarray(raw.snr, dtype=np.float64)
    snr = np.where(np.isfinite(snr_gaia) & (snr_gaia > 0), snr_gaia, spec.snr).astype(np.float32)
    xf, af = np.asarray(raw.has_xp, dtype=bool), np.asarray(raw.has_astrometry, dtype=bool)
    has_bp, has_rp = np.isfinite(raw.bp[:, 0]), np.isfinite(raw.rp[:, 0])
    plx = raw.parallax
    phot = np.isfinite(g) & np.isfinite(raw.bp_mag) & np.isfinite(raw.rp_mag)
    q = np.zeros(len(snr), dtype=np.int32)
    q |= np.where(~xf, Q_NO_XP, 0)
    q |= np.where(xf & ~has_bp, Q_NO_BP, 0)
    q |= np.where(xf & ~has_rp, Q_NO_RP, 0)
    q |= np.where(~af, Q_NO_ASTROMETRY, 0)
    q |= np.where(af & ~np.isfinite(plx), Q_NO_PARALLAX, 0)
    with np.errstate(invalid="ignore"):
        q |= np.where(np.isfinite(plx) & (plx <= 0), Q_NEGATIVE_PARALLAX, 0)
    q |= np.where(af & ~phot, Q_NO_PHOTOMETRY, 0)
    q |= np.where(snr < settings["low_snr"], Q_LOW_SNR, 0)
    q |= np.where(spec.n_masked > settings["max_masked_fraction"] * spec.flux.shape[1], Q_MANY_MASKED, 0)
    q |= np.where(spec.spike, Q_EDGE_SPIKE, 0)
    return {"spectrum": spec.flux, "spectrum_error": spec.error, "spectrum_mask": spec.mask, "xp": xp,
            "scalars": scalars, "snr": snr, "n_masked": spec.n_masked, "quality": q}


def split_hash(source_id: np.ndarray, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) from source_id by SplitMix64: stable across runs, machines and partitionings."""
    with np.errstate(over="ignore"):
        z = source_id.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def assign_split(source_id: np.ndarray, usable: np.ndarray, train: float, validation: float,
                 seed: int = 0) -> np.ndarray:
    """Each star's split by :func:`split_hash`: 'train' and 'validation' take the given shares, 'test' the
    rest; stars that are not ``usable`` are 'observed'."""
    u = split_hash(source_id, seed)
    split = np.where(u < train, "train", np.where(u < train + validation, "validation", "test"))
    return np.where(usable, split, "observed")


# -- normalisation statistics, mergeable across partitions ----------------------------------
def partial_moments(x: np.ndarray) -> dict:
    """Sufficient statistics of the columns of x (rows = stars), ignoring NaN."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    z = np.where(ok, x, 0.0)
    return {"n": ok.sum(axis=0), "sum": z.sum(axis=0), "sumsq": (z * z).sum(axis=0),
            "min": np.where(ok, x, np.inf).min(axis=0) if len(x) else np.full(x.shape[1:], np.inf),
            "max": np.where(ok, x, -np.inf).max(axis=0) if len(x) else np.full(x.shape[1:], -np.inf)}


def merge_moments(parts: list[dict]) -> dict:
    """Combine partitions' :func:`partial_moments`: counts and sums added, minima and maxima kept. Merge in
    a fixed order for reproducible rounding (preprocess sorts by partition)."""
    out = {"n": 0, "sum": 0.0, "sumsq": 0.0, "min": np.inf, "max": -np.inf}
    for p in parts:
        out["n"] = out["n"] + np.asarray(p["n"])
        out["sum"] = out["sum"] + np.asarray(p["sum"])
        out["sumsq"] = out["sumsq"] + np.asarray(p["sumsq"])
        out["min"] = np.minimum(out["min"], np.asarray(p["min"]))
        out["max"] = np.maximum(out["max"], np.asarray(p["max"]))
    return out


def finish_moments(m: dict) -> dict:
    """Normalisation statistics of merged moments as JSON-able lists: n, mean, population std (1 for a
    constant feature, so z-scoring never divides by zero), min and max."""
    n = np.maximum(np.asarray(m["n"], dtype=np.float64), 1)
    mean = np.asarray(m["sum"]) / n
    var = np.maximum(np.asarray(m["sumsq"]) / n - mean**2, 0.0)
    std = np.sqrt(var)
    std = np.where(std > 0, std, 1.0)  # constant features: scale 1, not a division by zero
    return {"n": np.asarray(m["n"]).tolist(), "mean": mean.tolist(), "std": std.tolist(),
            "min": np.asarray(m["min"]).tolist(), "max": np.asarray(m["max"]).tolist()}


@dataclass(frozen=True)
class Normaliser:
    """z-scoring with stored statistics: ``normalise`` and ``denormalise`` are exact inverses."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_stats(cls, stats: dict) -> "Normaliser":
        """A normaliser of one entry of ``stats.json`` (its ``mean`` and ``std``)."""
        return cls(np.asarray(stats["mean"], dtype=np.float64), np.asarray(stats["std"], dtype=np.float64))

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std as float32, the dtype the network is fed."""
        return ((x - self.mean) / self.std).astype(np.float32)

    def denormalise(self, z: np.ndarray) -> np.ndarray:
        """z * std + mean in float64: normalised values back in physical units."""
        return (np.asarray(z, dtype=np.float64) * self.std + self.mean)
