"""Gaia XP (BP/RP) continuous-spectrum coefficients from a smooth model SED.

The photon SED (blackbody with metal-line blanketing in the blue, a Balmer
jump in hot stars, TiO bands in cool stars and extinction) is multiplied by
a bell-shaped band response, mapped linearly onto the pseudo-wavelength axis
and projected on the 55 orthonormal Hermite functions that Gaia uses for
its XP representation. Coefficient errors scale with the flux; noise is drawn
with the correlation matrix written to the file.
"""

from __future__ import annotations

import numpy as np

from stellar.numerics import ar1_cholesky, ar1_correlation, ordered_matmul

N_BASES = 55
N_SAMPLES = 240
H_C_OVER_K = 1.4387769e7  # nm K
BANDS = {
    # name: (lambda_min, lambda_max, centre, half width of the response, pseudo-wavelength range)
    "bp": (330.0, 680.0, 505.0, 120.0, 7.0),
    "rp": (630.0, 1050.0, 840.0, 140.0, 7.0),
}
CORRELATION_RHO = {"bp": -0.30, "rp": -0.25}
BASIS_FUNCTION_ID = {"bp": 56, "rp": 57}


def hermite_functions(x: np.ndarray, n: int = N_BASES) -> np.ndarray:
    """Orthonormal Hermite functions phi_0..phi_{n-1} at x, shape (n, len(x)), by the stable recurrence."""
    out = np.empty((n, x.size))
    out[0] = np.pi ** -0.25 * np.exp(-0.5 * x**2)
    if n > 1:
        out[1] = np.sqrt(2.0) * x * out[0]
    for k in range(1, n - 1):
        out[k + 1] = np.sqrt(2.0 / (k + 1)) * x * out[k] - np.sqrt(k / (k + 1)) * out[k - 1]
    return out


def correlation_matrix(band: str) -> np.ndarray:
    """The band's coefficient correlation ``rho ** |i - j|`` (written to the file as Gaia does)."""
    return ar1_correlation(CORRELATION_RHO[band], N_BASES)


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    """Strict upper triangle, row-major: the 55*54/2 = 1485 values Gaia stores per band."""
    iu = np.triu_indices(matrix.shape[0], k=1)
    return matrix[iu]


class XpModel:
    """Gaia-like XP coefficients: each band's response, sampled Hermite basis and the Cholesky factor of
    its coefficient correlation, built once per generator."""

    def __init__(self) -> None:
        self.grid = {}
        self.basis = {}
        self.chol = {}
        for band, (lo, hi, centre, half, xr) in BANDS.items():
            lam = np.linspace(lo, hi, N_SAMPLES)
            x = np.linspace(-xr, xr, N_SAMPLES)
            self.grid[band] = (lam, x, np.exp(-(((lam - centre) / half) ** 4)))
            self.basis[band] = hermite_functions(x) * (x[1] - x[0])
            # closed form, not LAPACK: the generator's bits must not depend on the BLAS kernel
            self.chol[band] = ar1_cholesky(CORRELATION_RHO[band], N_BASES)

    @staticmethod
    def sed(lam: np.ndarray, teff: np.ndarray, m_h: np.ndarray, a_v: np.ndarray) -> np.ndarray:
        """Photon SED (arbitrary units), (B, len(lam))."""
        t = teff[:, None]
        planck = lam**-4 / np.expm1(H_C_OVER_K / (lam * t))  # photons: B_lambda * lambda
        blanket = 1.0 - np.clip(0.3 * 10 ** m_h[:, None] * np.exp(-(lam - 380.0) / 70.0) * (5500.0 / t) ** 2, 0, 0.8)
        balmer = 1.0 - 0.45 / (1.0 + np.exp(-(t - 7500.0) / 700.0)) * (lam < 365.0)
        cool = np.clip((4000.0 - t) / 600.0, 0.0, 1.0)
        tio = 1.0 - cool * 0.3 * (np.exp(-0.5 * ((lam - 715.0) / 12) ** 2) + np.exp(-0.5 * ((lam - 765.0) / 15) ** 2))
        ext = 10 ** (-0.4 * a_v[:, None] * (lam / 550.0) ** -1.3)
        return planck * blanket * balmer * tio * ext

    def coefficients(self, teff, m_h, a_v, band_mag_flux: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Noise-free coefficients (B, 55) per band, scaled to each band's mean flux (e-/s)."""
        out = {}
        for band in BANDS:
            lam, _, resp = self.grid[band]
            s = self.sed(lam, teff, m_h, a_v) * resp
            s /= s.sum(axis=1, keepdims=True)
            coeff = ordered_matmul(s, self.basis[band].T)
            out[band] = coeff * (band_mag_flux[band][:, None] * N_SAMPLES / 40.0)
        return out

    def observe(self, rng: np.random.Generator, coeff: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """Add correlated noise; returns per band the observed coefficients and their errors."""
        res = {}
        for band, c in coeff.items():
            n = c.shape[0]
            scale = (0.0015 * np.abs(c[:, :1]) + 0.3) * rng.uniform(0.7, 1.3, (n, 1))
            err = scale * (1.0 + 0.01 * np.arange(N_BASES))[None, :]
            z = ordered_matmul(rng.standard_normal((n, N_BASES)), self.chol[band].T)
            res[band] = {"coefficients": c + err * z, "errors": err.astype(np.float32)}
        return res
