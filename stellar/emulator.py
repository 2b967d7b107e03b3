"""A label-to-spectrum emulator: do the predicted labels reproduce the observed spectrum?

A spectroscopist believes a label when a model spectrum at that label fits
the observation. The emulator is a Cannon-like quadratic model, one per
pixel of the rebinned spectrum: ``flux_p(z) = theta_p . v(z)`` with
``v = [1, z_i, z_i z_j (i <= j)]`` of the normalised labels, fitted by
weighted least squares on the training stars (their catalogue labels), with
a per-pixel intrinsic scatter ``s_p`` (what the quadratic cannot follow)
estimated from the residuals and used as extra variance in a second pass.

At predict time it is evaluated at each star's *predicted* labels and gives
two statistics:

* ``spectrum_chi2``: the reduced chi-square of the observed spectrum against
  the emulated one, with variance ``flux_error^2 + s_p^2``, over unmasked pixels;
* ``line_chi2``: the same over windows around the instrument's strongest
  lines (the Ca II triplet for Gaia RVS), where doubled lines of a
  double-lined binary, the Paschen lines of a hot star and the too-weak lines
  of a very metal-poor star leave their residuals.

Binaries, hot stars and stars beyond the training grid fail this test even
where a 2-D map puts them among training stars. The fit is small
(21 x P numbers for 5 labels) and travels with the model as safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WINDOW_HALF_WIDTH_NM = 0.6  # around each strong line: covers an SB2's second component up to ~200 km/s
N_STRONG_LINES = 3
MAX_FIT_STARS = 20000


def design(z: np.ndarray) -> np.ndarray:
    """(N, L) normalised labels -> (N, 1 + L + L(L+1)/2) quadratic design matrix."""
    z = np.asarray(z, dtype=np.float64)
    n, L = z.shape
    iu, ju = np.triu_indices(L)
    return np.concatenate([np.ones((n, 1)), z, z[:, iu] * z[:, ju]], axis=1)


def line_window(wavelength: np.ndarray, lines: list[tuple[float, float]], n_lines: int = N_STRONG_LINES,
                half_width: float = WINDOW_HALF_WIDTH_NM) -> np.ndarray:
    """Pixels within ``half_width`` nm of the ``n_lines`` strongest lines; ``lines`` are (wavelength, strength)."""
    wave = np.asarray(wavelength, dtype=np.float64)
    strongest = sorted(lines, key=lambda t: -t[1])[:n_lines]
    window = np.zeros(wave.size, dtype=bool)
    for lam, _ in strongest:
        window |= np.abs(wave - lam) <= half_width
    return window


@dataclass
class SpectrumEmulator:
    """theta (K, P), scatter (P,), window (P,) bool: everything the statistics need."""

    theta: np.ndarray
    scatter: np.ndarray
    window: np.ndarray

    @classmethod
    def fit(cls, z: np.ndarray, flux: np.ndarray, error: np.ndarray, mask: np.ndarray, window: np.ndarray,
            ridge: float = 1e-4) -> "SpectrumEmulator":
        """Weighted least squares per pixel, twice: the second pass adds the intrinsic scatter.

        Args:
            z: (N, L) normalised training labels (rows with a missing label are dropped).
            flux, error: (N, P) continuum-normalised flux and its error.
            mask: (N, P) nonzero where a pixel is masked.
            window: (P,) strong-line pixels (for ``line_chi2``).
            ridge: Tikhonov term, relative to each pixel's mean diagonal, for near-degenerate terms.
        """
        ok = np.isfinite(z).all(axis=1)
        z, flux, error, mask = z[ok], flux[ok], error[ok], mask[ok]
        V = design(z)
        f = np.nan_to_num(np.asarray(flux, dtype=np.float64), nan=1.0)
        e2 = np.asarray(error, dtype=np.float64) ** 2
        good = (np.asarray(mask) == 0) & np.isfinite(e2) & (e2 > 0) & np.isfinite(np.asarray(flux, dtype=np.float64))
        scatter2 = np.zeros(f.shape[1])
        theta = np.zeros((V.shape[1], f.shape[1]))
        K = V.shape[1]
        iu, ju = np.triu_indices(K)
        outer = V[:, iu] * V[:, ju]  # (N, K(K+1)/2)
        for _ in range(2):
            w = np.where(good, 1.0 / (np.where(good, e2, 1.0) + scatter2[None, :]), 0.0)
            a_flat = outer.T @ w  # (K(K+1)/2, P)
            A = np.zeros((f.shape[1], K, K))
            A[:, iu, ju] = a_flat.T
            A[:, ju, iu] = a_flat.T
            diag = np.maximum(np.einsum("pkk->pk", A).mean(axis=1), 1e-12)
            A += ridge * diag[:, None, None] * np.eye(K)[None]
            b = (V.T @ (w * f)).T  # (P, K)
            theta = np.linalg.solve(A, b[:, :, None])[:, :, 0].T  # (K, P)
            r = f - V @ theta
            n_good = np.maximum(good.sum(axis=0), 1)
            scatter2 = np.maximum(np.where(good, r**2 - e2, 0.0).sum(axis=0) / n_good, 0.0)
        return cls(np.ascontiguousarray(theta, dtype=np.float32), np.sqrt(scatter2).astype(np.float32),
                   np.asarray(window, dtype=bool))

    def model(self, z: np.ndarray) -> np.ndarray:
        """(N, L) normalised labels -> (N, P) emulated spectra."""
        return design(z) @ self.theta.astype(np.float64)

    def statistics(self, z: np.ndarray, flux: np.ndarray, error: np.ndarray,
                   mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(spectrum_chi2, line_chi2) per star: reduced chi-squares over all unmasked pixels and over
        the strong-line windows (NaN where a star has no usable pixel there).

        On the predict hot path: float32 (N, P) arrays worked in place, so a batch costs a few
        passes over one array rather than float64 temporaries (the sums of ~10^3 terms lose
        nothing a threshold could see)."""
        f = np.asarray(flux, dtype=np.float32)
        e2 = np.square(np.asarray(error, dtype=np.float32))
        e2 += np.square(self.scatter.astype(np.float32))[None, :]
        good = (np.asarray(mask) == 0) & np.isfinite(f) & np.isfinite(e2) & (e2 > 0)
        r = design(z).astype(np.float32) @ self.theta.astype(np.float32)
        np.subtract(f, r, out=r)
        np.square(r, out=r)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.divide(r, e2, out=r)
        r[~good] = 0.0
        n_all = good.sum(axis=1)
        n_win = good[:, self.window].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            chi2 = r.sum(axis=1, dtype=np.float64) / n_all
            line = r[:, self.window].sum(axis=1, dtype=np.float64) / n_win
        return np.where(n_all > 0, chi2, np.nan), np.where(n_win > 0, line, np.nan)

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The fit as C-ordered arrays for safetensors (``emulator.safetensors`` of the ensemble's files), the
        window as uint8."""
        # C order: safetensors writes the raw buffer (theta comes out of the solve transposed, F-ordered)
        return {"theta": np.ascontiguousarray(self.theta), "scatter": np.ascontiguousarray(self.scatter),
                "window": np.ascontiguousarray(self.window.astype(np.uint8))}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> "SpectrumEmulator":
        """The emulator back from :meth:`to_tensors`' arrays."""
        return cls(np.asarray(t["theta"], np.float32), np.asarray(t["scatter"], np.float32),
                   np.asarray(t["window"]).astype(bool))
