"""Training augmentation by S/N: noisier copies of the labelled stars' spectra, at the catalogue's S/N.

A label survey is rarely the catalogue's mix of brightness: its stars were observed at high resolution,
so they are mostly bright, and their RVS spectra have a higher S/N than the catalogue's typical star. A
network trained only on them has seldom seen a spectrum as noisy as the faint half of what it will
label. :func:`degrade_spectra` adds Gaussian noise to a random share of each training batch so that the
chosen stars' spectra get an S/N drawn from the catalogue's own S/N distribution
(:func:`catalogue_snr_quantiles`, every star in the features table, labelled or not); a star already
fainter than its draw is left as it is (noise cannot be taken away). Only the spectrum changes: XP,
photometry and parallax keep their values, and the labels are the star's own. Validation and early
stopping see the real spectra.

The same noise makes the uncertainty calibration's faint copies of the validation stars
(:func:`degraded_copies`, used by :func:`stellar.train.calibration_stars`), there with the survey's own
noise as measured (:func:`spectrum_noise_excess`: its excess over the quoted errors, its pixel
correlation) and with G and parallax moved as the survey's relations say (:func:`fainter_star_model`,
:func:`move_away`).

The spectrum is the continuum-normalised flux with its error per pixel (the features' ``spectrum`` and
``spectrum_error``) and ``snr`` the features' S/N, so a star of S/N s0 reaches S/N s by adding noise
of standard deviation ``error * sqrt((s0 / s)^2 - 1)`` per pixel: white noise for the training
augmentation (whatever correlation the survey's own noise has), the measured excess and correlation for
the calibration's copies.
"""

from __future__ import annotations

import numpy as np
import torch

QUANTILES = 101  # the catalogue's S/N distribution as its 0, 1, ..., 100 % quantiles


def catalogue_snr_quantiles(features_root: str) -> np.ndarray:
    """The S/N quantiles (QUANTILES values, 0-100 %) of every star in the features table with a finite
    S/N: the distribution the augmentation draws target S/N from."""
    import pyarrow.dataset as pads

    from stellar.tables import TableStore

    path = TableStore(features_root).table_path("features")
    snr = pads.dataset(path, format="parquet", partitioning="hive").to_table(columns=["snr"]).column("snr")
    x = snr.to_numpy(zero_copy_only=False).astype(np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    if x.size == 0:
        raise ValueError(f"no star in {path} has a finite S/N: nothing to match the augmentation to")
    return np.quantile(x, np.linspace(0.0, 1.0, QUANTILES))


def draw_snr(quantiles: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` S/N values drawn from the distribution whose quantiles are ``quantiles`` (linear between them)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64) * (len(quantiles) - 1)
    i = torch.clamp(u.floor().long(), max=len(quantiles) - 2)
    f = u - i
    return quantiles[i] * (1 - f) + quantiles[i + 1] * f


def degrade_spectra(spectrum: torch.Tensor, error: torch.Tensor, snr: torch.Tensor, quantiles: torch.Tensor,
                    rate: float, generator: torch.Generator, excess: float = 1.0,
                    lag1: float = 0.0) -> torch.Tensor:
    """Add noise, in place, to the spectra of a random ``rate`` share of the stars so their S/N becomes one
    drawn from ``quantiles`` (where that is below their own). ``spectrum``, ``error``: (B, P) tensors on the
    CPU; ``snr``: (B,). ``excess`` and ``lag1``: the survey's noise as :func:`spectrum_noise_excess` measures
    it (its variance over the quoted errors' square, its neighbouring-pixel correlation); the added noise
    has both, so a copy is as noisy as a real star of the S/N it is given. Draws always the same numbers
    for a batch of a given size (the generator's stream does not depend on the data). Returns the (B,) S/N
    each star now has."""
    n, p = spectrum.shape
    hit = torch.rand(n, generator=generator) < rate
    target = draw_snr(quantiles, n, generator)
    noise = torch.randn(n, p, generator=generator, dtype=spectrum.dtype)
    if lag1 > 0:  # a 3-tap kernel (a, 1, a), unit variance, neighbour correlation lag1
        a = (1.0 - np.sqrt(max(1.0 - 2.0 * lag1**2, 0.0))) / (2.0 * lag1)
        padded = torch.nn.functional.pad(noise[:, None, :], (1, 1), mode="replicate")[:, 0, :]
        noise = (a * padded[:, :-2] + padded[:, 1:-1] + a * padded[:, 2:]) / np.sqrt(1.0 + 2.0 * a * a)
    noise = noise * float(np.sqrt(max(excess, 0.0)))
    s0 = snr.to(torch.float64)
    ok = hit & torch.isfinite(s0) & (s0 > 0) & (target < s0)
    scale = torch.where(ok, torch.sqrt(torch.clamp((s0 / target) ** 2 - 1.0, min=0.0)), torch.zeros_like(s0))
    sigma = torch.nan_to_num(error, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0) * scale.to(spectrum.dtype)[:, None]
    spectrum.add_(noise * sigma)
    return torch.where(ok, target, s0)


def degraded_copies(data: dict[str, torch.Tensor], quantiles: torch.Tensor, copies: int,
                    seed: int, excess: float = 1.0, lag1: float = 0.0,
                    fainter: tuple[dict, tuple[float, float]] | None = None) -> dict[str, torch.Tensor]:
    """``copies`` noisier versions of every star of ``data`` (a loaded split), each at an S/N drawn from
    ``quantiles``; only the copies whose draw is below the star's own S/N are kept (the others would be
    the star itself). Every other field is the star's own. Deterministic in ``seed``.

    What for: the uncertainty calibration is fitted on the validation stars, and a label survey's stars
    are bright; at the catalogue's faint end it has a few dozen of them. Their degraded copies show how
    the ensemble's errors grow as the spectrum's S/N falls, for every kind of star the validation split
    holds, where the faint validation stars alone are too few to say."""
    if not data or copies <= 0:
        return {}
    n = len(data["snr"])
    rep = {k: v.repeat_interleave(copies, dim=0) if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v
           for k, v in data.items()}
    spectrum = rep["spectrum"].clone()
    gen = torch.Generator().manual_seed(int(seed))
    snr = degrade_spectra(spectrum, rep["spectrum_error"], rep["snr"], quantiles, 1.0, gen, excess, lag1)
    s0 = rep["snr"].to(torch.float64)
    changed = snr < s0
    rep["spectrum"] = spectrum
    # the quoted errors of a star of the new S/N (what the spectrum-consistency check divides by)
    rep["spectrum_error"] = rep["spectrum_error"] * torch.where(changed, s0 / snr, 1.0).to(spectrum.dtype)[:, None]
    if fainter is not None and "scalars" in rep:
        stats, model = fainter
        rep["scalars"] = move_away(rep["scalars"], stats, s0.numpy(), snr.numpy(), model, gen)
    rep["snr"] = snr.to(rep["snr"].dtype)
    return {k: v[changed] if isinstance(v, torch.Tensor) and v.shape[:1] == changed.shape else v
            for k, v in rep.items()}


def spectrum_noise_excess(flux: np.ndarray, error: np.ndarray, mask: np.ndarray,
                          model: np.ndarray) -> tuple[float, float]:
    """(excess, lag1): how the spectra's real noise departs from their quoted errors, from the residuals
    ``flux - model`` of stars whose model spectra are known (the emulator at their catalogue labels).

    ``excess``: the slope of a star's mean squared residual against its mean squared quoted error, over
    stars of every S/N (the intercept takes the model's own misfit, the same at any S/N); 1 where the
    errors are honest, above 1 where the noise is correlated between the pixels the preprocessing binned
    (a quoted error that assumes independence is then too small) or underestimated. Fitted by iteratively
    reweighted least squares (weights: a mean square's inverse variance), Huber-clipped, so a few stars
    the model does not fit cannot move it. ``lag1``: the neighbouring pixels' correlation of the
    residuals over their errors, from the stars where the noise dominates them (S/N in the lowest third).
    Both are clipped to plausible ranges ([1, 10] and [0, 0.45]): noise is never taken away."""
    good = (np.asarray(mask) == 0) & np.isfinite(flux) & np.isfinite(error) & (error > 0) & np.isfinite(model)
    n_good = good.sum(axis=1)
    use = n_good > 10
    if use.sum() < 30:
        return 1.0, 0.0
    r = np.where(good, flux - model, 0.0)[use]
    e2 = np.where(good, np.square(error), 0.0)[use]
    g = good[use]
    y = (r**2).sum(axis=1) / n_good[use]
    x = e2.sum(axis=1) / n_good[use]
    A = np.stack([x, np.ones_like(x)], axis=1)
    beta = np.array([1.0, 0.0])
    for _ in range(30):
        pred = np.maximum(A @ beta, 1e-12)
        w = 1.0 / pred**2
        z = (y - pred) * np.sqrt(w)
        scale = max(1.4826 * float(np.median(np.abs(z))), 1e-12)
        ww = w * np.minimum(1.0, 2.0 * scale / np.maximum(np.abs(z), 1e-12))
        beta = np.linalg.solve(A.T @ (ww[:, None] * A), A.T @ (ww * y))
    excess = float(np.clip(beta[0], 1.0, 10.0))
    noisy = x >= np.quantile(x, 2.0 / 3.0)
    q = np.where(g, r / np.sqrt(np.where(e2 > 0, e2, 1.0)), 0.0)[noisy]
    both = (g[:, 1:] & g[:, :-1])[noisy]  # pairs of neighbouring good pixels
    left, right = np.where(both, q[:, :-1], 0.0), np.where(both, q[:, 1:], 0.0)
    den = np.sqrt(np.sum(left**2) * np.sum(right**2))
    lag1 = float(np.clip(np.sum(left * right) / den if den > 0 else 0.0, 0.0, 0.45))
    return excess, lag1


def _robust_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of y ~ x by least squares, 3-MAD clipped (three passes)."""
    keep = np.ones(len(x), bool)
    slope, icpt = 0.0, float(np.median(y))
    for _ in range(3):
        if keep.sum() < 10:
            break
        slope, icpt = np.polyfit(x[keep], y[keep], 1)
        res = y - (slope * x + icpt)
        keep = np.abs(res) <= 3.0 * 1.4826 * np.median(np.abs(res[keep])) + 1e-12
    return float(slope), float(icpt)


def fainter_star_model(scalars: np.ndarray, snr: np.ndarray) -> tuple[float, float] | None:
    """(d ln S/N / dG, d ln parallax_error / dG): how the spectrum's S/N and the parallax's error change
    with the star's G magnitude in this survey, fitted on stars that have both (``scalars`` physical,
    :data:`stellar.features.SCALAR_NAMES`). It says how much fainter (and so how much further away, at
    the same luminosity) a star whose spectrum has a given lower S/N is, and what its parallax is then
    worth; measured, not assumed, since it depends on the instrument and its background. None where the
    stars are too few or S/N does not fall with G."""
    from stellar.features import SCALAR_NAMES

    x = np.asarray(scalars, dtype=np.float64)
    g = x[:, SCALAR_NAMES.index("phot_g_mean_mag")]
    e = x[:, SCALAR_NAMES.index("parallax_error")]
    ok = np.isfinite(g) & (g != 0) & np.isfinite(snr) & (snr > 0)
    if ok.sum() < 30:
        return None
    d_snr, _ = _robust_line(g[ok], np.log(snr[ok]))
    if d_snr >= -0.05:
        return None
    okp = ok & np.isfinite(e) & (e > 0)
    d_plx = _robust_line(g[okp], np.log(e[okp]))[0] if okp.sum() >= 30 else 0.0
    return d_snr, max(d_plx, 0.0)


def move_away(scalars: torch.Tensor, stats: dict, snr_from: np.ndarray, snr_to: np.ndarray,
              model: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """The normalised ``scalars`` (N, S) of each star moved further away until its spectrum's S/N falls
    from ``snr_from`` to ``snr_to``: G fainter by ln(snr_to / snr_from) / (d ln S/N / dG), the parallax
    smaller by 10^(-0.2 dG) with its error grown as the survey's error grows with G (``model``,
    :func:`fainter_star_model`), the difference in noise drawn and added; the reduced parallax (a
    luminosity, distance-free) and its softened log recomputed (:func:`stellar.features.scalar_features`).
    The colours are kept (no extra extinction). Stars without G keep their values; stars without a
    parallax keep theirs (zero-filled)."""
    from stellar.features import SCALAR_NAMES, Normaliser, scalar_features

    d_snr, d_plx = model
    norm = Normaliser.from_stats(stats)
    x = norm.denormalise(scalars.numpy())
    n = SCALAR_NAMES.index
    g, bp_rp, g_rp = x[:, n("phot_g_mean_mag")], x[:, n("bp_rp")], x[:, n("g_rp")]
    plx, err = x[:, n("parallax")], x[:, n("parallax_error")]
    ratio = np.asarray(snr_to, dtype=np.float64) / np.asarray(snr_from, dtype=np.float64)
    dg = np.where(np.isfinite(ratio) & (ratio < 1), np.log(np.clip(ratio, 1e-6, 1.0)) / d_snr, 0.0)
    noise = torch.randn(len(plx), generator=generator, dtype=torch.float64).numpy()
    has_g = np.isfinite(g) & (g != 0)
    has_plx = has_g & np.isfinite(err) & (err > 0)
    shrink = 10.0 ** (-0.2 * dg)
    err2 = err * np.exp(d_plx * dg)
    top_up = np.sqrt(np.clip(err2**2 - (err * shrink) ** 2, 0.0, None))
    plx2 = plx * shrink + noise * top_up
    g2 = g + dg
    rp = g2 - g_rp
    new = scalar_features(g2, bp_rp + rp, rp, plx2, err2).astype(np.float64)
    out = x.copy()
    out[has_g, n("phot_g_mean_mag")] = g2[has_g]
    for k in ("parallax", "parallax_error", "reduced_parallax", "log_reduced_parallax"):
        out[has_plx, n(k)] = new[has_plx, n(k)]
    return torch.from_numpy(norm.normalise(out))
