"""A label-to-spectrum emulator: do the predicted labels reproduce the observed spectrum?

A spectroscopist believes a label when a model spectrum at that label fits
the observation. The emulator is a Cannon-like quadratic model, one per
pixel of the rebinned spectrum: ``flux_p(z) = theta_p . v(z)`` with
``v = [1, z_i, z_i z_j (i <= j)]`` of the normalised labels, fitted by
weighted least squares on the training stars (their catalogue labels), with
a per-pixel intrinsic scatter ``s_p`` (what the quadratic cannot follow)
estimated from the residuals and used as extra variance in a second pass.

At predict time it is evaluated at each star's *predicted* labels and gives
three statistics:

* ``spectrum_chi2``: the reduced chi-square of the observed spectrum against
  the emulated one, with variance ``flux_error^2 + s_p^2``, over unmasked pixels;
* ``line_chi2``: the same over windows around the instrument's strongest
  lines (the Ca II triplet for Gaia RVS), where doubled lines of a
  double-lined binary, the Paschen lines of a hot star and the too-weak lines
  of a very metal-poor star leave their residuals.
* ``line_broadening``: how much broader the observed lines are than the
  emulated ones, as a matched filter: the residuals projected on the emulated
  spectrum's second difference (what a little extra Gaussian broadening adds
  to a line: a shallower core, deeper wings), in units of that projection's
  noise, ``sum(r T / v) / sqrt(sum(T^2 / v))``, with ``T`` first made
  orthogonal to the emulated absorption (``model - 1``), so that lines
  merely weaker or stronger than emulated read zero. A double-lined binary whose
  components are closer than the resolution element leaves no second line for
  ``line_chi2`` to see, only lines wider than any single star of its labels;
  this one number gathers that signal from every line the emulator holds,
  not only the strongest three. Rapid rotators broaden their lines too: they
  read high on it alike.

Binaries, hot stars and stars beyond the training grid fail this test even
where a 2-D map puts them among training stars. The fit is small
(21 x P numbers for 5 labels) and travels with the model as safetensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

WINDOW_HALF_WIDTH_NM = 0.6  # around each strong line: covers an SB2's second component up to ~200 km/s
N_STRONG_LINES = 3
MAX_FIT_STARS = 20000
# The share of the emulated lines' curvature the broadening filter reads (SpectrumEmulator.line_pixels)
BROADENING_ENERGY = 0.95


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

    @functools.cached_property
    def line_pixels(self) -> np.ndarray:
        """Indices of the pixels the broadening filter reads: those holding
        :data:`BROADENING_ENERGY` of the emulated spectra's summed squared second difference, over the
        label grid's centre and +-1 along each label (the continuum, where the template is ~0 and adds
        only noise and time, is left out: 133 of the 800 binned RVS pixels on the hard survey's model).
        Never the two end pixels."""
        n_lab = int(round((np.sqrt(8 * self.theta.shape[0] + 1) - 3) / 2))  # 1 + L + L(L+1)/2 terms
        grid = np.concatenate([np.zeros((1, n_lab)), np.eye(n_lab), -np.eye(n_lab)])
        m = self.model(grid)
        t2 = np.square(m[:, 2:] - 2.0 * m[:, 1:-1] + m[:, :-2]).sum(axis=0)
        if not np.any(t2 > 0):
            return np.zeros(0, dtype=np.intp)
        order = np.argsort(t2)[::-1]
        keep = order[: int(np.searchsorted(np.cumsum(t2[order]) / t2.sum(), BROADENING_ENERGY)) + 1]
        return np.sort(keep) + 1

    @functools.cached_property
    def _line_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, len(line_pixels)) float64 coefficients of the second difference and of the model at the line
        pixels."""
        th = self.theta.astype(np.float64)
        idx = self.line_pixels
        return th[:, idx + 1] - 2.0 * th[:, idx] + th[:, idx - 1], np.ascontiguousarray(th[:, idx])

    def model(self, z: np.ndarray) -> np.ndarray:
        """(N, L) normalised labels -> (N, P) emulated spectra."""
        return design(z) @ self.theta.astype(np.float64)

    def statistics(self, z: np.ndarray, flux: np.ndarray, error: np.ndarray,
                   mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(spectrum_chi2, line_chi2, line_broadening) per star: reduced chi-squares over all unmasked
        pixels and over the strong-line windows (NaN where a star has no usable pixel there), and the
        broadening matched filter over the unmasked :attr:`line_pixels` (module docstring; NaN without a
        usable pixel or line).

        On the predict hot path: float32 (N, P) arrays worked in place, so a batch costs a few
        passes over one array rather than float64 temporaries (the sums of ~10^3 terms lose
        nothing a threshold could see)."""
        f = np.asarray(flux, dtype=np.float32)
        e2 = np.square(np.asarray(error, dtype=np.float32))
        e2 += np.square(self.scatter.astype(np.float32))[None, :]
        good = (np.asarray(mask) == 0) & np.isfinite(f) & np.isfinite(e2) & (e2 > 0)
        v64 = design(z)
        m = v64.astype(np.float32) @ self.theta.astype(np.float32)
        # the broadening filter, on the pixels where the emulated lines curve (line_pixels): the emulator
        # is linear in theta, so the template T (the emulated spectrum's second difference there) and the
        # model there are small products of their own and the whole-spectrum passes stay those of the
        # chi-squares. In float64 with plain row sums: the filter is a difference of sums, and float32
        # BLAS or SIMD einsum orders (which vary with threads and alignment) would move a star across its
        # threshold between two runs. D is the absorption, model - 1.
        idx = self.line_pixels
        theta_t, theta_m = self._line_terms
        tmpl = v64 @ theta_t
        absn = v64 @ theta_m
        bad_idx = ~np.take(good, idx, axis=1)  # np.take: twice as fast as fancy indexing here
        with np.errstate(invalid="ignore", divide="ignore"):
            ws = 1.0 / np.take(e2, idx, axis=1).astype(np.float64)
            rs = np.take(f, idx, axis=1) - absn
        ws[bad_idx] = 0.0
        rs[bad_idx] = 0.0
        absn -= 1.0  # weaker or stronger lines are this, not broadening
        tw = tmpl * ws
        rt, tt, td = (rs * tw).sum(axis=1), (tmpl * tw).sum(axis=1), (absn * tw).sum(axis=1)
        dw = np.multiply(absn, ws, out=tw)
        dd, rd = (absn * dw).sum(axis=1), (rs * dw).sum(axis=1)
        # the chi-squares, in place over the whole spectrum
        chi = np.subtract(f, m, out=m)
        np.square(chi, out=chi)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.divide(chi, e2, out=chi)
        chi[~good] = 0.0
        n_all = good.sum(axis=1)
        n_win = good[:, self.window].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            chi2 = chi.sum(axis=1, dtype=np.float64) / n_all
            line = chi[:, self.window].sum(axis=1, dtype=np.float64) / n_win
            k = np.where(dd > 0, td / dd, 0.0)  # the template made orthogonal to the absorption
            den = tt - k * td
            broad = (rt - k * rd) / np.sqrt(den)
        return (np.where(n_all > 0, chi2, np.nan), np.where(n_win > 0, line, np.nan),
                np.where((n_all > 0) & (den > 1e-6 * np.maximum(tt, 1e-300)), broad, np.nan))

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
