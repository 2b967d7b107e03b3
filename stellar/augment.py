"""Training augmentation by S/N: noisier copies of the labelled stars' spectra, at the catalogue's S/N.

A label survey is rarely the catalogue's mix of brightness: its stars were observed at high resolution,
so they are mostly bright, and their RVS spectra have a higher S/N than the catalogue's typical star. A
network trained only on them has seldom seen a spectrum as noisy as the faint half of what it will
label. :func:`degrade_spectra` adds Gaussian noise to a random share of each training batch so that the
chosen stars' spectra get an S/N drawn from the catalogue's own S/N distribution
(:func:`catalogue_snr_quantiles`, every star in the features table, labelled or not); a star already
fainter than its draw is left as it is (noise cannot be taken away). Only the spectrum changes: XP,
photometry and parallax keep their values, and the labels are the star's own. Validation, early
stopping and the calibration see the real spectra.

The spectrum is the continuum-normalised flux with its error per pixel (the features' ``spectrum`` and
``spectrum_error``) and ``snr`` the features' S/N, so a star of S/N s0 reaches S/N s by adding noise
of standard deviation ``error * sqrt((s0 / s)^2 - 1)`` per pixel. White noise, whatever correlation
the survey's own noise has.
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
                    rate: float, generator: torch.Generator) -> torch.Tensor:
    """Add noise, in place, to the spectra of a random ``rate`` share of the stars so their S/N becomes one
    drawn from ``quantiles`` (where that is below their own). ``spectrum``, ``error``: (B, P) tensors on the
    CPU; ``snr``: (B,). Draws always the same numbers for a batch of a given size (the generator's stream
    does not depend on the data). Returns the (B,) S/N each star now has."""
    n, p = spectrum.shape
    hit = torch.rand(n, generator=generator) < rate
    target = draw_snr(quantiles, n, generator)
    noise = torch.randn(n, p, generator=generator, dtype=spectrum.dtype)
    s0 = snr.to(torch.float64)
    ok = hit & torch.isfinite(s0) & (s0 > 0) & (target < s0)
    scale = torch.where(ok, torch.sqrt(torch.clamp((s0 / target) ** 2 - 1.0, min=0.0)), torch.zeros_like(s0))
    sigma = torch.nan_to_num(error, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0) * scale.to(spectrum.dtype)[:, None]
    spectrum.add_(noise * sigma)
    return torch.where(ok, target, s0)
