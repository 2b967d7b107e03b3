"""A compact quadratic-in-labels Cannon (Ness et al. 2015), vectorised, for the accuracy benchmark.

The ``thecannon`` package is not used: its releases predate numpy 2. This
implementation follows the same model: per pixel, flux = theta_p . v(l) with
v = [1, l_i, l_i l_j (i <= j)] of standardised labels, a per-pixel intrinsic
scatter s_p, weighted least squares for theta (training), and per star a
weighted non-linear least-squares fit of the labels (test), done for all
pixels / all stars at once.
"""

from __future__ import annotations

import numpy as np


def _vectorizer(lab: np.ndarray) -> np.ndarray:
    n, k = lab.shape
    iu = np.triu_indices(k)
    quad = lab[:, iu[0]] * lab[:, iu[1]]
    return np.concatenate([np.ones((n, 1)), lab, quad], axis=1)


def _jacobian(lab: np.ndarray) -> np.ndarray:
    """d v / d l: (N, D, K)."""
    n, k = lab.shape
    iu = np.triu_indices(k)
    d = 1 + k + len(iu[0])
    jac = np.zeros((n, d, k))
    jac[:, 1 : 1 + k, :] = np.eye(k)[None]
    for q, (i, j) in enumerate(zip(*iu)):
        jac[:, 1 + k + q, i] += lab[:, j]
        jac[:, 1 + k + q, j] += lab[:, i]
    return jac


class QuadraticCannon:
    def fit(self, flux: np.ndarray, ivar: np.ndarray, labels: np.ndarray) -> "QuadraticCannon":
        self.offset = labels.mean(axis=0)
        self.scale = labels.std(axis=0)
        v = _vectorizer((labels - self.offset) / self.scale)  # (N, D)
        self.scatter2 = np.zeros(flux.shape[1])
        for _ in range(2):  # WLS, then again with the fitted intrinsic scatter
            w = 1.0 / (1.0 / np.maximum(ivar, 1e-12) + self.scatter2[None, :])
            w = np.where(ivar > 0, w, 0.0)
            a = np.einsum("np,ni,nj->pij", w, v, v, optimize=True)
            b = np.einsum("np,ni,np->pi", w, v, flux, optimize=True)
            self.theta = np.linalg.solve(a + 1e-8 * np.eye(v.shape[1])[None], b[..., None])[..., 0]  # (P, D)
            resid = flux - v @ self.theta.T
            ok = ivar > 0
            var_res = np.where(ok, resid**2, 0).sum(0) / np.maximum(ok.sum(0), 1)
            var_noise = np.where(ok, 1.0 / np.maximum(ivar, 1e-12), 0).sum(0) / np.maximum(ok.sum(0), 1)
            self.scatter2 = np.maximum(var_res - var_noise, 0.0)
        return self

    def fit_starts(self, labels: np.ndarray, n_starts: int = 8, seed: int = 0) -> "QuadraticCannon":
        """Starting points for the label fit: training stars spread over label space."""
        rng = np.random.default_rng(seed)
        z = (labels - self.offset) / self.scale
        self.starts = z[rng.choice(len(z), size=n_starts, replace=False)]
        self.starts[0] = 0.0
        return self

    def predict(self, flux: np.ndarray, ivar: np.ndarray, n_iter: int = 25) -> np.ndarray:
        """Best (lowest chi^2) of Gauss-Newton fits from several starts: the quadratic model has
        local minima (dwarf/giant degeneracy), as in the original Cannon's multi-start test step."""
        w = 1.0 / (1.0 / np.maximum(ivar, 1e-12) + self.scatter2[None, :])
        w = np.where(ivar > 0, w, 0.0)
        starts = getattr(self, "starts", np.zeros((1, len(self.offset))))
        best_lab, best_chi = None, None
        for start in starts:
            lab = self._fit_from(flux, w, np.repeat(start[None, :], flux.shape[0], axis=0), n_iter)
            chi = (w * (flux - _vectorizer(lab) @ self.theta.T) ** 2).sum(axis=1)
            if best_lab is None:
                best_lab, best_chi = lab, chi
            else:
                better = chi < best_chi
                best_lab[better], best_chi[better] = lab[better], chi[better]
        return best_lab * self.scale + self.offset

    def _fit_from(self, flux: np.ndarray, w: np.ndarray, lab: np.ndarray, n_iter: int) -> np.ndarray:
        k = lab.shape[1]
        for _ in range(n_iter):  # Gauss-Newton with a little damping, every star at once
            v = _vectorizer(lab)
            model = v @ self.theta.T
            jac = np.einsum("pd,ndk->npk", self.theta, _jacobian(lab), optimize=True)
            r = flux - model
            jtj = np.einsum("npk,np,npl->nkl", jac, w, jac, optimize=True) + 1e-3 * np.eye(k)[None]
            jtr = np.einsum("npk,np,np->nk", jac, w, r, optimize=True)
            step = np.linalg.solve(jtj, jtr[..., None])[..., 0]
            lab = np.clip(lab + step, -6, 6)
        return lab
