"""The physical limit: the generator's own forward model fitted to each star by weighted least squares.

    .venv/bin/python benchmarks/limit.py --work DIR [--stars 600] [--seed 0] [--starts 4] [--json PATH]
                                         [--set KEY=VALUE ...]
    .venv/bin/python benchmarks/limit.py --work DIR --check-truth 40   # the model at the true parameters

DIR is a finished pipeline run on a survey of the synthetic generator (``stellar/synth``): its truth
(``synth/truth``), ingested tables (``tables``: the RVS, XP and gaia_source values as the generator
wrote them) and features (``features``: the splits and the S/N). For a stratified sample of
in-distribution stars (truth ``is_ood`` false) of the test split and the observed stars (equal
numbers in the S/N bins 15-25, 25-50 and > 50, the few stars below S/N 15 in proportion; ``all`` is
weighted back to the population of the strata, as benchmarks/accuracy.py counts it), it fits the
exact model that made the data -- ``SpectrumModel`` (line opacities, microturbulence, broadening,
the 862 nm DIB, LSF), ``XpModel`` and the photometry and parallax relations of ``population.py`` --
and reports the RMSE and bias of the five labels per S/N bin. This is standard spectroscopy with a
perfect model: about the best any method can do on that survey. The realism (which nuisances exist)
is read from the survey's own manifest (``synth/survey.json``), else from the config.

Two fits per star, each reported separately:

* ``rvs``: the RVS spectrum as the pipeline sees it (the archive spectrum rebinned 3x over its good
  pixels as :func:`stellar.features.rebin` does; the full-resolution model rebinned over the same
  pixels; 15 raw pixels at each end, the generator's edge-spike zone, left out). Free: teff, logg,
  m_h, alpha_m, fe_h, vbroad (1-15 km/s; 1-60 with fast rotators), A_V (here only the DIB strength,
  0-6), and, where the survey's realism has them, the RV residual (+-5 sigma) and the three cosine
  terms of the continuum wiggle (+-5 sigma each). Residuals are whitened with the published errors,
  and, where the realism correlates the pixel noise, with the generator's correlation (its smoothing
  kernel carried through the rebinning: a banded Cholesky factor per star).
* ``all_inputs``: the same spectrum plus the 2 x 55 XP coefficients (whitened with their errors and
  the generator's AR(1) correlation ``rho**|i-j|``), G, BP-RP and the parallax. The photometry is
  noiseless in the generator and quoted to ~1 mmag, 20-100x tighter than anything else it constrains,
  so it enters as exact constraints (as weighted residuals it made the problem so stiff that LM
  crawled along the valley): A_V = (BP-RP - bp_rp0(teff, m_h)) / 0.42 (clipped to 0-6; beyond that
  the BP-RP residual, with the quoted BP/RP errors, counts) and the distance modulus
  mu = G - M_G(teff, logg, mass) - A_G. G-RP adds nothing (the generator makes BP-G, hence G-RP, a
  function of BP-RP). Extra free nuisances: log10 mass (0.5-1.6 Msun, the population's range) and the
  ratio (0.35-1.6) of the A_V the generator's distance iteration used to the star's final A_V (it
  redraws A_V each iteration and keeps the last, so its G is M_G + mu + 0.25 A_V + 0.58 A_V,2, not
  M_G + mu + 0.83 A_V: 0.02 mag rms on the demo survey). The parallax residual then constrains
  logg only within the mass range.

Both fits carry the generator's chemistry relation ``fe_h = m_h - 0.25 alpha_m + N(0, 0.02)``
(``population._chemistry``) as one pseudo-datum. It is needed: every line in the RVS window is of
Fe or of an alpha element (Ca, Si, Ti, S), so the spectrum constrains m_h and alpha_m only through
their sum; without the relation the RVS-only m_h and alpha_m would be set by the bounds (and at low
metallicity the XP blanketing is too weak to split them). A trained method learns the same relation
from its labels. Bounds are the generator's in-distribution ranges (teff 3500-7500 K, logg 0.5-5,
m_h -2.5-0.5, alpha_m -0.1-0.45, fe_h -2.75-0.65). A(Li) is fixed at 1.05 (no Li line in the window).

Starts (never the truth): a library of spectra (``--library``, default 3000) at label vectors drawn
from the training split's catalogue labels (vbroad 5 km/s, A_V 0.5) is matched to each star by
chi-square; the ``--starts`` (4) best mutually distinct matches start the RVS fit. The all-inputs fit
starts from the best RVS solution and from the ``--starts`` - 1 best distinct library matches by
spectrum + XP chi-square (A_V from the colour, the XP model on an A_V grid); the mass starts from the
M_G the parallax implies (else from log g), the A_V ratio at 1. The fit is a bound-projected
Levenberg-Marquardt with geodesic acceleration, vectorised over all stars and starts at once, with
a forward-difference Jacobian of the exact model (the label columns one batched model call; vbroad,
A_V and the wiggle terms reuse the cached opacities); the best chi-square per star wins. On the
demo survey the fits reach the chi-square of a fit started at the truth for every star checked, and
6 starts instead of 3 changed 2 of 200 stars' minima.

Cost: ~0.3 ms of one core per model spectrum, ~10 spectra per LM iteration, ~5-10 iterations per
start: 600 stars with 4 + 4 starts take about 2 minutes on one core (reading and the library
included; the hard realism, with 4 more free parameters and longer valleys, about twice that).

What this limit assumes that a real survey lacks: the exact model (line list, line physics,
broadening, LSF, DIB, XP response and SED are those that made the data, with nothing to calibrate);
exactly known noise (published errors that are the true standard deviations, the pixel-noise
correlation and the XP correlation known exactly, though Gaia's RVS errors say nothing of the
former); noiseless colour-temperature, bolometric and extinction relations (G, BP, RP follow
deterministic formulas, so BP-RP pins bp_rp0(teff, m_h) + 0.42 A_V); and the exact chemistry
relation. It does not use the population's other regularities (the isochrone, the alpha bimodality,
the mass-teff relation of dwarfs): a method that learns them from its training labels can beat this
limit at low S/N, where the likelihood alone is broad (RVS-only log g above all).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one thread, before numpy loads its BLAS (physical_limit also limits it itself)
    for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_v, "1")

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LABELS = ("teff", "logg", "m_h", "alpha_m", "fe_h")
BINS = (("15-25", 15.0, 25.0), ("25-50", 25.0, 50.0), (">50", 50.0, np.inf), ("all", 0.0, np.inf))
STRATA = (("<15", 0.0, 15.0), ("15-25", 15.0, 25.0), ("25-50", 25.0, 50.0), (">50", 50.0, np.inf))

# generator ranges of the in-distribution population (population.py); vbroad upper bound grows with fast rotators
BOUNDS = {"teff": (3500.0, 7500.0), "logg": (0.5, 5.0), "m_h": (-2.5, 0.5), "alpha_m": (-0.1, 0.45),
          "fe_h": (-2.75, 0.65), "vbroad": (1.0, 15.0), "a_v": (0.0, 6.0),
          "log_mass": (float(np.log10(0.5)), float(np.log10(1.6))), "av_ratio": (0.35, 1.6)}
# forward-difference steps
STEP = {"teff": 2.0, "logg": 0.004, "m_h": 0.002, "alpha_m": 0.002, "fe_h": 0.002, "vbroad": 0.05,
        "a_v": 0.01, "rv": 0.05, "log_mass": 0.001, "av_ratio": 0.002}
MAX_ITER = 100  # LM iterations per start
CHEM_SIGMA = 0.02  # population._chemistry: fe_h = m_h - 0.25 alpha_m + N(0, 0.02)
A_LI = 1.05
EDGE_RAW_PIXELS = 15  # raw pixels masked at each end: the generator's edge spikes are 3-14 px wide
# population.draw_population's extinction coefficients: A_G, the A_V term of G = G_RVS + ..., E(BP-RP)
A_G_PER_AV, G_PER_AV, EBPRP_PER_AV = 0.83, 0.25, 0.42


# ----------------------------------------------------------------------------------------- data
@dataclass
class Stars:
    """The chosen stars' observed data, in the order of ``source_id``."""

    source_id: np.ndarray
    snr: np.ndarray
    stratum: np.ndarray  # index into STRATA
    weight: np.ndarray  # population weight of the star within 'all'
    ok: np.ndarray  # (S, n_pix) raw pixels used
    y: np.ndarray  # (S, nb) rebinned flux (as stellar.features.rebin, over ``ok``)
    e: np.ndarray  # (S, nb) its error (0: no data)
    raw_err: np.ndarray  # (S, n_pix)
    xp: dict  # band -> (coeff (S, 55), err (S, 55)), NaN rows: no band
    mags: np.ndarray  # (S, 3) G, BP, RP
    mag_err: np.ndarray  # (S, 3)
    plx: np.ndarray
    plx_err: np.ndarray


def _dataset(path, ids, columns=None):
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    t = pads.dataset(path, format="parquet", partitioning="hive").to_table(
        columns=columns, filter=pc.field("source_id").isin(ids))
    sid = t["source_id"].to_numpy()
    order = {s: i for i, s in enumerate(sid)}
    return t, np.array([order.get(s, -1) for s in ids])


def _lists(col, rows, width, dtype=np.float64):
    out = np.full((rows.size, width), np.nan, dtype=dtype)
    vals = col.to_pylist()
    for i, r in enumerate(rows):
        if r >= 0 and vals[r] is not None and len(vals[r]) == width:
            out[i] = vals[r]
    return out


def choose_stars(features_root: Path, truth, n_stars: int, seed: int):
    """Stratified sample of in-distribution test + observed stars: (source_id, snr, stratum, weight)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from stellar.tables import TableStore

    path = TableStore(features_root).table_path("features")
    t = pads.dataset(path, format="parquet", partitioning="hive").to_table(
        columns=["source_id", "snr", "split"], filter=pc.field("split").isin(["test", "observed"]))
    sid = t["source_id"].to_numpy()
    snr = np.nan_to_num(t["snr"].to_numpy(zero_copy_only=False).astype(np.float64), nan=0.0)
    keep = ~truth.loc[sid, "is_ood"].to_numpy(bool)
    sid, snr = sid[keep], snr[keep]
    order = np.argsort(sid)
    sid, snr = sid[order], snr[order]
    stratum = np.array([next(k for k, (_, lo, hi) in enumerate(STRATA) if lo <= s < hi) for s in snr])
    pop = np.bincount(stratum, minlength=len(STRATA))
    n_low = int(round(n_stars * pop[0] / max(1, pop.sum())))
    want = np.array([n_low] + [(n_stars - n_low) // 3 + (1 if k < (n_stars - n_low) % 3 else 0) for k in range(3)])
    rng = np.random.default_rng(seed)
    pick, weight = [], []
    for k in range(len(STRATA)):
        members = np.flatnonzero(stratum == k)
        m = min(int(want[k]), members.size)
        if m == 0:
            continue
        chosen = np.sort(rng.choice(members, m, replace=False))
        pick.append(chosen)
        weight.append(np.full(m, pop[k] / m))
    pick = np.concatenate(pick)
    weight = np.concatenate(weight)
    order = np.argsort(pick)
    pick, weight = pick[order], weight[order]
    return sid[pick], snr[pick], stratum[pick], weight / weight.sum()


def load_stars(cfg, stats: dict, sid, snr, stratum, weight) -> Stars:
    """The observed data of the chosen stars from the ingested tables (as written by the generator)."""
    from stellar.features import rebin
    from stellar.synth.population import ZP_BP, ZP_RP
    from stellar.tables import TableStore

    tables = TableStore(cfg.ingest.output_dir)
    pre = stats.get("preprocess", {})
    factor = int(pre.get("rebin", stats.get("rebin", cfg.preprocess.rebin)))
    npx = int(pre.get("n_pixels", 0)) or None
    rvs, r_rows = _dataset(tables.table_path("rvs"), sid, ["source_id", "flux", "flux_error"])
    if npx is None:
        npx = len(rvs["flux"][int(r_rows.max())].as_py())
    flux = _lists(rvs["flux"], r_rows, npx)
    err = _lists(rvs["flux_error"], r_rows, npx)
    ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    ok[:, :EDGE_RAW_PIXELS] = False
    ok[:, npx - EDGE_RAW_PIXELS:] = False
    y, count = rebin(np.nan_to_num(flux), ok, factor)
    e2, _ = rebin(np.nan_to_num(err) ** 2, ok, factor)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.where(count > 0, np.sqrt(e2 / np.maximum(count, 1)), 0.0)
    y = np.where(count > 0, y, 1.0)

    xpt, x_rows = _dataset(tables.table_path("xp"), sid)
    xp = {}
    for band in ("bp", "rp"):
        c = _lists(xpt[f"{band}_coefficients"], x_rows, 55)
        ce = _lists(xpt[f"{band}_coefficient_errors"], x_rows, 55)
        bad = ~(np.isfinite(c).all(axis=1) & np.isfinite(ce).all(axis=1) & (ce > 0).all(axis=1))
        c[bad], ce[bad] = np.nan, np.nan
        xp[band] = (c, ce)
    ast, a_rows = _dataset(tables.table_path("astrometry"), sid)

    def col(name):
        v = ast[name].to_numpy(zero_copy_only=False).astype(np.float64)
        return np.where(a_rows >= 0, v[np.maximum(a_rows, 0)], np.nan)

    g, bp, rp = col("phot_g_mean_mag"), col("phot_bp_mean_mag"), col("phot_rp_mean_mag")
    gf, gfe = col("phot_g_mean_flux"), col("phot_g_mean_flux_error")
    mag_err = np.empty((sid.size, 3))
    mag_err[:, 0] = 2.5 / np.log(10) * gfe / gf
    for j, (m, zp) in enumerate(((bp, ZP_BP), (rp, ZP_RP)), start=1):
        f = 10 ** (-0.4 * (m - zp))  # the archive's BP/RP flux errors are not ingested: the generator's formula
        mag_err[:, j] = 2.5 / np.log(10) * (np.sqrt(f) * 0.02 + f * 0.0005) / f
    return Stars(sid, snr, stratum, weight, ok, y, e, np.nan_to_num(err), xp, np.stack([g, bp, rp], axis=1),
                 mag_err, col("parallax"), col("parallax_error"))


# ----------------------------------------------------------------------------------- the model
class Forward:
    """The generator's observables of the stars ``rows`` at parameters ``p`` (B, P), as whitened
    residuals (model - data) / sigma, and their Jacobian.

    With ``use_aux`` (the all-inputs fit) A_V and the distance modulus are not free parameters but
    follow from the photometry, which the generator makes noiselessly: A_V = (BP-RP - bp_rp0(teff,
    m_h)) / 0.42 (clipped to 0-6, the colour residual then counts), mu = G - M_G(teff, logg, mass) -
    (0.25 + 0.58 av_ratio) A_V. Their quoted errors (~1 mmag) are 20-100x below anything else they
    constrain; as residuals they made the least-squares problem so stiff that LM crawled."""

    def __init__(self, instrument, realism, stars: Stars, factor: int, names: list[str], use_aux: bool):
        from stellar.instruments import ALPHA_ELEMENTS
        from stellar.synth.population import ZP_BP, ZP_RP
        from stellar.synth.spectra import SpectrumModel
        from stellar.synth.xp import CORRELATION_RHO, N_SAMPLES, XpModel

        self.model = SpectrumModel(instrument)
        lines = self.model.lines
        assert "a_li" not in lines.labels, "a Li line in the window: A(Li) would have to be free"
        # lines whose abundance is m_h alone: none in the RVS window, so d/d m_h = d/d alpha_m there
        self.mh_alone = any(k == 0 and e not in ALPHA_ELEMENTS and e != "Fe" for k, e in zip(lines.kind, lines.elements))
        self.st = stars
        self.factor = factor
        self.names = names
        self.ix = {n: i for i, n in enumerate(names)}
        self.use_aux = use_aux
        self.av_free = "a_v" in self.ix
        npx = stars.ok.shape[1]
        self.nb = npx // factor
        self.n_wig = sum(n.startswith("wig") for n in names)
        x = np.linspace(0.0, np.pi, npx)
        self.cos = np.stack([np.cos(k * x) for k in range(1, 4)])
        self.xpm = XpModel()
        self.rho = CORRELATION_RHO
        self.xp_scale = N_SAMPLES / 40.0
        self.count = stars.ok[:, : self.nb * factor].reshape(-1, self.nb, factor).sum(axis=2)
        self.corr_px = float(realism.noise_correlation_px)
        if self.corr_px > 0:
            self._banded_whitening()
        else:
            self.inv_e = np.where(stars.e > 0, 1.0 / np.where(stars.e > 0, stars.e, 1.0), 0.0)
        self.y_w = self.whiten(stars.y[:, :, None], np.arange(stars.y.shape[0]))[:, :, 0]
        self.xp_w = {}
        for band, (c, ce) in stars.xp.items():
            self.xp_w[band] = np.nan_to_num(self._ar1(np.nan_to_num(c) / np.where(np.isfinite(ce), ce, 1.0), band))
        self.band_flux = {"bp": 10 ** (-0.4 * (stars.mags[:, 1] - ZP_BP)), "rp": 10 ** (-0.4 * (stars.mags[:, 2] - ZP_RP))}
        self.colour = stars.mags[:, 1] - stars.mags[:, 2]
        self.colour_err = np.hypot(stars.mag_err[:, 1], stars.mag_err[:, 2])
        self.n_res = self.nb + 1 + (2 * 55 + 1 + 1 if use_aux else 0)

    # -- noise
    def _banded_whitening(self):
        """Per-star banded Cholesky factor of the rebinned spectrum's covariance under the generator's
        correlated pixel noise (survey._correlated_normal: unit-variance Gaussian kernel)."""
        from scipy.linalg import cholesky_banded

        from stellar.synth.survey import _noise_kernel

        k = _noise_kernel(self.corr_px)
        rho = np.array([np.sum(k[: k.size - d] * k[d:]) for d in range(k.size)])  # autocorrelation, lags 0..
        f, nb = self.factor, self.nb
        nbw = (rho.size - 1 + f - 1) // f + 1  # bins reachable
        st = self.st
        S = st.y.shape[0]
        v = np.where(st.ok, st.raw_err, 0.0)[:, : nb * f]
        ab = np.zeros((S, nbw + 1, nb))
        pix = np.arange(nb * f)
        for d in range(-(rho.size - 1), rho.size):
            i = pix[max(0, -d): nb * f - max(0, d)]
            j = i + d
            kb = j // f - i // f
            keep = kb >= 0
            i, j, kb = i[keep], j[keep], kb[keep]
            contrib = v[:, i] * v[:, j] * rho[abs(d)]
            np.add.at(ab, (slice(None), kb, i // f), contrib)
        cnt = np.maximum(self.count, 1).astype(np.float64)
        for kk in range(ab.shape[1]):
            ab[:, kk, : nb - kk] /= cnt[:, : nb - kk] * cnt[:, kk:]
        empty = self.count == 0
        self.chol = []
        for s in range(S):
            a = ab[s].copy()
            e = empty[s]
            for kk in range(1, a.shape[0]):  # decouple empty bins
                a[kk, : nb - kk][e[: nb - kk] | e[kk:]] = 0.0
            a[0][e] = 1.0
            self.chol.append(cholesky_banded(a, lower=True))
        self.empty = empty

    def whiten(self, m: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(B, nb, C) binned spectra -> whitened (empty bins 0)."""
        if self.corr_px <= 0:
            return m * self.inv_e[rows][:, :, None]
        from scipy.linalg import solve_banded

        out = np.empty_like(m)
        for b, s in enumerate(rows):
            L = self.chol[s]
            x = np.where(self.empty[s][:, None], 0.0, m[b])
            out[b] = solve_banded((L.shape[0] - 1, 0), L, x)
        return out

    def _ar1(self, z: np.ndarray, band: str) -> np.ndarray:
        """L^-1 z for the AR(1) correlation rho**|i-j| (last axis = the 55 coefficients)."""
        r = self.rho[band]
        out = np.empty_like(z)
        out[..., 0] = z[..., 0]
        out[..., 1:] = (z[..., 1:] - r * z[..., :-1]) / np.sqrt(1.0 - r * r)
        return out

    # -- derived nuisances
    def a_v_raw(self, p, rows):
        """A_V that puts the model BP-RP on the observed one (unclipped); the free A_V in the RVS fit."""
        from stellar.synth.population import bp_rp_intrinsic

        if self.av_free:
            return p[:, self.ix["a_v"]]
        return (self.colour[rows] - bp_rp_intrinsic(p[:, self.ix["teff"]], p[:, self.ix["m_h"]])) / EBPRP_PER_AV

    def a_v(self, p, rows):
        return np.clip(np.nan_to_num(self.a_v_raw(p, rows), nan=0.0), *BOUNDS["a_v"])

    def mu(self, p, rows, a_v=None):
        """Distance modulus that puts the model G on the observed one."""
        from stellar.synth.population import absolute_g

        g = lambda n: p[:, self.ix[n]]  # noqa: E731
        av = self.a_v(p, rows) if a_v is None else a_v
        mg = absolute_g(g("teff"), g("logg"), 10 ** g("log_mass"))
        return self.st.mags[rows, 0] - mg - (G_PER_AV + (A_G_PER_AV - G_PER_AV) * g("av_ratio")) * av

    # -- spectrum
    def _params(self, p: np.ndarray, rows: np.ndarray) -> dict:
        g = lambda n: p[:, self.ix[n]]  # noqa: E731
        return {"teff": g("teff"), "logg": g("logg"), "m_h": g("m_h"), "alpha_m": g("alpha_m"), "fe_h": g("fe_h"),
                "a_li": np.full(p.shape[0], A_LI), "vbroad": g("vbroad"), "a_v": self.a_v(p, rows)}

    def _rv(self, p):
        return p[:, self.ix["rv"]] if "rv" in self.ix else None

    @staticmethod
    def _capped(tau):
        """SpectrumModel.intrinsic's depth cap: exp in float32, as the opacity is."""
        from stellar.synth.spectra import MAX_DEPTH

        np.negative(tau, out=tau)
        np.exp(tau, out=tau)
        return 1.0 - MAX_DEPTH * (1.0 - tau.astype(np.float64))

    def _broaden(self, star, vb):
        from stellar.synth.spectra import macroturbulence_kms, rotation_kms

        return self.model.broaden(star, rotation_kms(vb), macroturbulence_kms(vb))

    def _wiggle(self, p):
        if not self.n_wig:
            return None
        c = np.stack([p[:, self.ix[f"wig{k}"]] for k in range(1, 4)], axis=1)
        return 1.0 + c @ self.cos

    def _bin(self, raw, rows):
        f, nb = self.factor, self.nb
        ok = self.st.ok[rows][:, : nb * f]
        v = np.where(ok, raw[:, : nb * f], 0.0).reshape(raw.shape[0], nb, f).sum(axis=2)
        return v / np.maximum(self.count[rows], 1)

    def spectrum_raw(self, p, rows):
        """Unwiggled model flux (B, n_pix) -- SpectrumModel.spectra, whose broadened path every star with
        vbroad >= 1 takes -- and its cached pieces (stellar lines capped, DIB capped, broadened)."""
        prm, rv = self._params(p, rows), self._rv(p)
        star = self._capped(self.model.optical_depth(prm, rv, interstellar=False))
        dib = self._capped(self.model.optical_depth(prm, rv, interstellar=True))
        broad = self._broaden(star, prm["vbroad"])
        return self.model.convolve(broad * dib), (star, dib, broad)

    # -- XP, photometry, parallax, chemistry
    def xp_coeff(self, teff, m_h, a_v, rows):
        """XpModel.coefficients (BLAS product instead of the generator's ordered one)."""
        from stellar.synth.xp import BANDS

        out = {}
        for band in BANDS:
            lam, _, resp = self.xpm.grid[band]
            s = self.xpm.sed(lam, teff, m_h, a_v) * resp
            s /= s.sum(axis=1, keepdims=True)
            out[band] = (s @ self.xpm.basis[band].T) * (self.band_flux[band][rows, None] * self.xp_scale)
        return out

    def aux(self, p, rows, xp_cache=None):
        """(B, n_aux) whitened residuals: chemistry [, XP bp, XP rp, BP-RP (non-zero only where A_V is
        clipped), parallax]."""
        from stellar.synth.population import bp_rp_intrinsic

        g = lambda n: p[:, self.ix[n]]  # noqa: E731
        chem = ((g("fe_h") - g("m_h") + 0.25 * g("alpha_m")) / CHEM_SIGMA)[:, None]
        if not self.use_aux:
            return chem, None
        st = self.st
        av = self.a_v(p, rows)
        coeff = xp_cache if xp_cache is not None else self.xp_coeff(g("teff"), g("m_h"), av, rows)
        parts = [chem]
        for band in ("bp", "rp"):
            c, ce = st.xp[band]
            has = np.isfinite(ce[rows, 0])[:, None]
            w = self._ar1(coeff[band] / np.where(np.isfinite(ce[rows]), ce[rows], 1.0), band) - self.xp_w[band][rows]
            parts.append(np.where(has, w, 0.0))
        colour = bp_rp_intrinsic(g("teff"), g("m_h")) + EBPRP_PER_AV * av
        rc = (colour - self.colour[rows]) / self.colour_err[rows]
        parts.append(np.where(np.isfinite(rc), rc, 0.0)[:, None])
        plx = 10 ** (2.0 - self.mu(p, rows, av) / 5.0)
        rp = (plx - st.plx[rows]) / st.plx_err[rows]
        parts.append(np.where(np.isfinite(rp), rp, 0.0)[:, None])
        return np.concatenate(parts, axis=1), coeff

    # -- residuals and Jacobian
    def residuals(self, p, rows, keep=False):
        raw, cache = self.spectrum_raw(p, rows)
        wig = self._wiggle(p)
        flux = raw * wig if wig is not None else raw
        spec = self.whiten(self._bin(flux, rows)[:, :, None], rows)[:, :, 0] - self.y_w[rows]
        a, coeff = self.aux(p, rows)
        r = np.concatenate([spec, a], axis=1)
        return (r, (raw, cache, wig, coeff)) if keep else r

    def jacobian(self, p, rows, r0, state, lo, hi):
        """Forward differences (steps STEP, turned inwards at an upper bound). Spectrum: the label (and RV)
        columns in one stacked model call; vbroad re-broadens the cached opacity, a free A_V recomputes
        the DIB only, the wiggle terms are analytic. Auxiliary residuals: cheap, XP only recomputed for
        the parameters it depends on."""
        raw0, (star0, dib0, broad0), wig, coeff0 = state
        B, P = p.shape
        nb = self.nb
        J = np.zeros((B, self.n_res, P))
        h = np.array([STEP.get(n, 1e-3) for n in self.names])
        sign = np.where(p + h[None, :] > hi, -1.0, 1.0)
        hs = h[None, :] * sign  # (B, P)
        spec0 = self._bin(raw0 * wig if wig is not None else raw0, rows)
        label_cols = [self.ix[n] for n in ("teff", "logg", "m_h", "fe_h")]
        if self.mh_alone or not self.av_free:  # m_h also moves the derived A_V (colour), alpha_m does not
            label_cols.append(self.ix["alpha_m"])
        dib_moves = {self.ix["teff"], self.ix["m_h"]} if not self.av_free else set()
        full = label_cols + ([self.ix["rv"]] if "rv" in self.ix else [])
        nf = len(full)
        pp = np.repeat(p[None], nf, axis=0)
        for k, j in enumerate(full):
            pp[k, :, j] += hs[:, j]
        pp = pp.reshape(-1, P)
        rows_f = np.tile(rows, nf)
        prm, rv = self._params(pp, rows_f), self._rv(pp)
        star = self._capped(self.model.optical_depth(prm, rv, interstellar=False))
        dib = np.tile(dib0, (nf, 1))
        redo = np.flatnonzero(np.repeat([(j in dib_moves) or (self.names[j] == "rv") for j in full], B))
        if redo.size:
            sub = {k: v[redo] for k, v in prm.items()}
            dib[redo] = self._capped(self.model.optical_depth(sub, None if rv is None else rv[redo], interstellar=True))
        fl = self.model.convolve(self._broaden(star, prm["vbroad"]) * dib).reshape(nf, B, -1)
        cols = [(j, fl[k]) for k, j in enumerate(full)]
        j = self.ix["vbroad"]  # the opacity does not depend on vbroad
        cols.append((j, self.model.convolve(self._broaden(star0, p[:, j] + hs[:, j]) * dib0)))
        if self.av_free:  # only the interstellar band
            j = self.ix["a_v"]
            q = p.copy()
            q[:, j] += hs[:, j]
            dib_av = self._capped(self.model.optical_depth(self._params(q, rows), self._rv(q), interstellar=True))
            cols.append((j, self.model.convolve(broad0 * dib_av)))
        dspec = np.zeros((B, nb, P))
        for j, fl in cols:
            dspec[:, :, j] = (self._bin(fl * wig if wig is not None else fl, rows) - spec0) / hs[:, j, None]
        if self.ix["alpha_m"] not in label_cols:
            dspec[:, :, self.ix["alpha_m"]] = dspec[:, :, self.ix["m_h"]]
        for k in range(1, self.n_wig + 1):  # d/dc_k of raw * (1 + sum c cos): raw * cos_k
            dspec[:, :, self.ix[f"wig{k}"]] = self._bin(raw0 * self.cos[k - 1][None, :], rows)
        J[:, :nb, :] = self.whiten(dspec, rows)
        a0 = r0[:, nb:]
        xp_dep = {self.ix[n] for n in ("teff", "m_h", "a_v") if n in self.ix}
        for j in range(P):
            q = p.copy()
            q[:, j] += hs[:, j]
            a, _ = self.aux(q, rows, None if (j in xp_dep or coeff0 is None) else coeff0)
            J[:, nb:, j] = (a - a0) / hs[:, j, None]
        return J


# ------------------------------------------------------------------------------------ the fit
def levenberg_marquardt(fw: Forward, p0: np.ndarray, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                        max_iter: int = 40, chunk: int = 160, log=None,
                        geodesic: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bound-projected LM for every (row, start) at once. Returns best-fit parameters, chi-square, iterations."""
    out_p, out_c, out_it = p0.copy(), np.zeros(len(rows)), np.zeros(len(rows), int)
    for c0 in range(0, len(rows), chunk):
        sl = slice(c0, c0 + chunk)
        p = np.clip(p0[sl].copy(), lo, hi)
        rw = rows[sl]
        B, P = p.shape
        r, state = fw.residuals(p, rw, keep=True)
        chi = (r * r).sum(axis=1)
        lam = np.full(B, 1e-3)
        J = np.zeros((B, fw.n_res, P))
        need = np.ones(B, bool)
        active = np.ones(B, bool)
        it_count = np.zeros(B, int)
        cache = {"raw": state[0], "star": state[1][0], "dib": state[1][1], "broad": state[1][2],
                 "wig": state[2], "coeff": state[3]}

        def sub(idx):
            return (cache["raw"][idx], (cache["star"][idx], cache["dib"][idx], cache["broad"][idx]),
                    None if cache["wig"] is None else cache["wig"][idx],
                    None if cache["coeff"] is None else {k: v[idx] for k, v in cache["coeff"].items()})

        for it in range(max_iter):
            a = np.flatnonzero(active)
            if a.size == 0:
                break
            it_count[a] += 1
            jn = a[need[a]]
            if jn.size:
                J[jn] = fw.jacobian(p[jn], rw[jn], r[jn], sub(jn), lo, hi)
                need[jn] = False
            Ja, ra = J[a], r[a]
            A = np.einsum("bnp,bnq->bpq", Ja, Ja)
            g = np.einsum("bnp,bn->bp", Ja, ra)
            # parameters held at a bound by the gradient are frozen for this step
            at_lo = (p[a] <= lo + 1e-12) & (g > 0)
            at_hi = (p[a] >= hi - 1e-12) & (g < 0)
            frozen = at_lo | at_hi
            d = np.einsum("bpp->bp", A).copy()
            scale = np.maximum(d, 1e-9 * d.max(axis=1, keepdims=True) + 1e-30)
            M = A + lam[a, None, None] * scale[:, :, None] * np.eye(P)[None]
            M = np.where(frozen[:, :, None] | frozen[:, None, :], 0.0, M)
            M[:, np.arange(P), np.arange(P)] = np.where(frozen, 1.0, M[:, np.arange(P), np.arange(P)])
            g = np.where(frozen, 0.0, g)
            try:
                Minv = np.linalg.inv(M)
            except np.linalg.LinAlgError:  # a numerically singular system somewhere in the batch
                Minv = np.linalg.pinv(M)
            step = -np.einsum("bpq,bq->bp", Minv, g)
            if geodesic:  # second-order correction along the step (Transtrum & Sethna 2012)
                hh = 0.1
                rh = fw.residuals(p[a] + hh * step, rw[a])
                rpp = 2.0 / hh * ((rh - ra) / hh - np.einsum("bnp,bp->bn", Ja, step))
                g2 = np.where(frozen, 0.0, np.einsum("bnp,bn->bp", Ja, rpp))
                acc2 = -0.5 * np.einsum("bpq,bq->bp", Minv, g2)
                dsc = np.sqrt(scale)
                ratio = 2.0 * np.linalg.norm(dsc * acc2, axis=1) / np.maximum(np.linalg.norm(dsc * step, axis=1), 1e-300)
                ok2 = np.isfinite(ratio) & (ratio <= 0.75)
                step = np.where(ok2[:, None], step + np.nan_to_num(acc2), step)
            pt = np.clip(p[a] + step, lo, hi)
            rt, st = fw.residuals(pt, rw[a], keep=True)
            ct = (rt * rt).sum(axis=1)
            better = np.isfinite(ct) & (ct < chi[a])
            gain = np.where(better, chi[a] - ct, 0.0)
            acc = a[better]
            p[acc], r[acc], chi[acc] = pt[better], rt[better], ct[better]
            for key, val in (("raw", st[0]), ("star", st[1][0]), ("dib", st[1][1]), ("broad", st[1][2])):
                cache[key][acc] = val[better]
            if cache["wig"] is not None:
                cache["wig"][acc] = st[2][better]
            if cache["coeff"] is not None:
                for k in cache["coeff"]:
                    cache["coeff"][k][acc] = st[3][k][better]
            need[acc] = True
            lam[acc] = np.maximum(lam[acc] / 5.0, 1e-9)
            rej = a[~better]
            lam[rej] *= 6.0
            # converged: a (nearly) Gauss-Newton step that gains < 1e-3 in chi-square; or no step gains
            done_acc = acc[(gain[better] < 1e-3) & (lam[acc] <= 1e-2)]
            done_rej = rej[lam[rej] > 1e5]
            active[done_acc] = False
            active[done_rej] = False
        out_p[sl], out_c[sl], out_it[sl] = p, chi, it_count
        if log:
            log(f"    LM chunk {c0 // chunk + 1}: {B} fits, median {np.median(it_count):.0f} iterations")
    return out_p, out_c, out_it


# ---------------------------------------------------------------------------------- the starts
def training_labels(features_root: Path, n: int, seed: int) -> np.ndarray:
    """(n, 5) label vectors drawn from the training split's catalogue labels (clipped to the bounds)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from stellar.tables import TableStore

    t = pads.dataset(TableStore(features_root).table_path("features"), format="parquet", partitioning="hive") \
        .to_table(columns=list(LABELS), filter=pc.field("split") == "train")
    y = np.stack([t[k].to_numpy(zero_copy_only=False).astype(np.float64) for k in LABELS], axis=1)
    y = y[np.isfinite(y).all(axis=1)]
    rng = np.random.default_rng([seed, 7])
    y = y[rng.choice(len(y), min(n, len(y)), replace=False)]
    for j, k in enumerate(LABELS):
        y[:, j] = np.clip(y[:, j], *BOUNDS[k])
    return y


LABEL_SCALE = np.array([250.0, 0.4, 0.25, 0.1, 0.25])  # "distinct starts": more than one of these apart


def distinct_best(chi2: np.ndarray, lib: np.ndarray, k: int) -> np.ndarray:
    """(S, k) library indices: per star the best match, then the best ones farther than LABEL_SCALE."""
    order = np.argsort(chi2, axis=1)[:, :400]
    out = np.zeros((chi2.shape[0], k), int)
    z = lib / LABEL_SCALE
    for s in range(chi2.shape[0]):
        chosen = [order[s, 0]]
        for idx in order[s, 1:]:
            if len(chosen) == k:
                break
            if np.all(np.max(np.abs(z[chosen] - z[idx]), axis=1) > 1.0):
                chosen.append(idx)
        while len(chosen) < k:
            chosen.append(order[s, len(chosen)])
        out[s] = chosen
    return out


def library_spectra(fw: Forward, lib: np.ndarray) -> np.ndarray:
    """(K, nb) library spectra rebinned over every pixel (vbroad 5, A_V 0.5, no RV, no wiggle)."""
    K = len(lib)
    p = _default_params(fw.names, lib)
    out = []
    for c in range(0, K, 500):
        raw, _ = fw.spectrum_raw(p[c:c + 500], np.zeros(min(K, c + 500) - c, int))
        f = fw.factor
        out.append(raw[:, : fw.nb * f].reshape(-1, fw.nb, f).mean(axis=2))
    return np.concatenate(out)


def spectrum_chi2(fw: Forward, libspec: np.ndarray) -> np.ndarray:
    """(S, K) diagonal-error chi-square of each star against each library spectrum."""
    e = fw.st.e
    w = np.where(e > 0, 1.0 / np.where(e > 0, e, 1.0) ** 2, 0.0)
    y = fw.st.y
    return (w * y * y).sum(axis=1)[:, None] - 2.0 * (w * y) @ libspec.T + w @ (libspec**2).T


def xp_chi2(fw: Forward, lib: np.ndarray, av_grid: np.ndarray) -> np.ndarray:
    """(S, K) XP chi-square of each star against each library (teff, m_h), A_V from the star's BP-RP
    (the XP model on an A_V grid, interpolated)."""
    from stellar.synth.population import bp_rp_intrinsic

    K, na = len(lib), av_grid.size
    shapes = {band: np.zeros((K, na, 55)) for band in ("bp", "rp")}
    for c in range(0, K, 200):  # the XP model with unit band flux, on the A_V grid
        k = np.arange(c, min(K, c + 200))
        teff, mh, av = np.repeat(lib[k, 0], na), np.repeat(lib[k, 2], na), np.tile(av_grid, k.size)
        one = np.ones(teff.size)
        saved, fw.band_flux = fw.band_flux, {"bp": one, "rp": one}
        try:
            coeff = fw.xp_coeff(teff, mh, av, np.arange(teff.size))
        finally:
            fw.band_flux = saved
        for band in shapes:
            shapes[band][k] = coeff[band].reshape(k.size, na, 55)
    st = fw.st
    S = fw.colour.size
    out = np.zeros((S, K))
    br0 = bp_rp_intrinsic(lib[:, 0], lib[:, 2])
    for s in range(S):
        a = np.clip(np.nan_to_num((fw.colour[s] - br0) / EBPRP_PER_AV), av_grid[0], av_grid[-1])
        pos = np.interp(a, av_grid, np.arange(av_grid.size))
        i0 = np.minimum(pos.astype(int), av_grid.size - 2)
        f = (pos - i0)[:, None]
        for band in ("bp", "rp"):
            c, ce = st.xp[band]
            if not np.isfinite(ce[s, 0]):
                continue
            m = (1 - f) * shapes[band][np.arange(K), i0] + f * shapes[band][np.arange(K), i0 + 1]
            w = fw._ar1((m * fw.band_flux[band][s] - c[s]) / ce[s], band)
            out[s] += (w * w).sum(axis=1)
    return out


def nuisance_start(fw: Forward, p: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mass from the parallax where it is precise (the M_G it implies), else from log g; A_V ratio 1."""
    from stellar.synth.population import bolometric_correction_g

    st, ix = fw.st, fw.ix
    p = p.copy()
    p[:, ix["av_ratio"]] = 1.0
    logg, teff = p[:, ix["logg"]], p[:, ix["teff"]]
    guess = np.log10(np.maximum(np.where(logg > 3.7, 0.6 + 0.7 * (teff - 4000.0) / 2600.0, 1.2), 0.1))
    plx, pe = st.plx[rows], st.plx_err[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        mg = st.mags[rows, 0] - (10.0 - 5.0 * np.log10(plx)) - A_G_PER_AV * fw.a_v(p, rows)
        log_l = (4.74 - bolometric_correction_g(teff) - mg) / 2.5
        lm = log_l + (logg - 4.438) - 4.0 * np.log10(teff / 5772.0)
    lm = np.where((plx > 3 * pe) & np.isfinite(lm), lm, guess)
    p[:, ix["log_mass"]] = np.clip(lm, *BOUNDS["log_mass"])
    return p


# ------------------------------------------------------------------------------------- driver
def _realism(cfg):
    """The realism the survey was generated with (its manifest), else the config's."""
    from stellar.config import RealismConfig

    manifest = Path(cfg.synth.output_dir) / "survey.json"
    if manifest.is_file():
        r = json.loads(manifest.read_text()).get("config", {}).get("realism")
        if isinstance(r, dict):
            return RealismConfig(**r), str(manifest)
    return cfg.synth.realism, "config"


def param_layout(realism, all_inputs: bool):
    """Free parameters and their bounds: the labels, vbroad, A_V (RVS fit; derived from the colour in the
    all-inputs fit), the RV residual and continuum-wiggle terms where the realism has them, and in the
    all-inputs fit log10 mass and the A_V ratio of the generator's distance iteration."""
    names = list(LABELS) + ["vbroad"] + ([] if all_inputs else ["a_v"])
    bounds = dict(BOUNDS)
    if realism.fast_rotator_fraction > 0:
        bounds["vbroad"] = (1.0, 60.0)
    if realism.rv_residual_kms > 0:
        names.append("rv")
        bounds["rv"] = (-5 * realism.rv_residual_kms, 5 * realism.rv_residual_kms)
    if realism.continuum_wiggle > 0:
        sd = realism.continuum_wiggle * np.sqrt(2.0 / 3.0)
        for k in range(1, 4):
            names.append(f"wig{k}")
            bounds[f"wig{k}"] = (-5 * sd, 5 * sd)
            STEP[f"wig{k}"] = 1e-4
    if all_inputs:
        names += ["log_mass", "av_ratio"]
    lo = np.array([bounds[n][0] for n in names])
    hi = np.array([bounds[n][1] for n in names])
    return names, lo, hi


def _default_params(names, lib_labels):
    p = np.zeros((len(lib_labels), len(names)))
    p[:, :5] = lib_labels
    ix = {n: i for i, n in enumerate(names)}
    p[:, ix["vbroad"]] = 5.0
    if "a_v" in ix:
        p[:, ix["a_v"]] = 0.5
    return p


def _setup(work: Path, overrides):
    from stellar.config import load_config
    from stellar.instruments import load_instrument
    from stellar.tables import load_stats

    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", *(overrides or [])])
    inst = load_instrument(cfg.instrument)
    stats = load_stats(cfg.preprocess.output_dir)
    realism, source = _realism(cfg)
    factor = int(stats.get("preprocess", {}).get("rebin", stats.get("rebin", cfg.preprocess.rebin)))
    return cfg, inst, stats, realism, source, factor


def _n_data(fw: Forward) -> np.ndarray:
    n = (fw.count > 0).sum(axis=1) + 1
    if fw.use_aux:
        n = n + 1 + 55 * sum(np.isfinite(fw.st.xp[b][1][:, 0]).astype(int) for b in ("bp", "rp"))
    return n


def physical_limit(work: Path, n_stars: int = 600, seed: int = 0, overrides: list[str] | None = None,
                   n_starts: int = 4, library: int = 3000, log=None) -> dict:
    """Fit the generator's forward model to a stratified sample of in-distribution test + observed stars.

    Returns ``{"rvs": {"teff|15-25": rmse, ...}, "all_inputs": {...}, "n": {"teff|15-25": stars, ...},
    "bias_rvs": {...}, "bias_all_inputs": {...}, "meta": {...}}`` (bins as benchmarks/accuracy.py:
    15-25, 25-50, >50, all; ``all`` weighted back to the population of the S/N strata)."""
    import pyarrow.parquet as pq

    from stellar.numerics import one_blas_thread

    log = log or (lambda s: print(s, flush=True))
    t_start = time.perf_counter()
    work = Path(work)
    with one_blas_thread():
        cfg, inst, stats, realism, rsrc, factor = _setup(work, overrides)
        truth = pq.read_table(Path(cfg.synth.output_dir) / "truth",
                              columns=["source_id", "is_ood", *LABELS]).to_pandas().set_index("source_id")
        sid, snr, stratum, weight = choose_stars(Path(cfg.preprocess.output_dir), truth, n_stars, seed)
        stars = load_stars(cfg, stats, sid, snr, stratum, weight)
        S = sid.size
        t_read = time.perf_counter() - t_start
        log(f"limit: {S} stars read in {t_read:.0f} s; realism from {rsrc}: {realism.model_dump()}")
        lib = training_labels(Path(cfg.preprocess.output_dir), library, seed)
        results, fits_meta, per_star = {}, {}, {}
        best_rvs = rvs_names = chi_lib_rvs = None
        for fit in ("rvs", "all_inputs"):
            t0 = time.perf_counter()
            names, lo, hi = param_layout(realism, fit == "all_inputs")
            fw = Forward(inst, realism, stars, factor, names, use_aux=fit == "all_inputs")
            if fit == "rvs":
                chi_lib = spectrum_chi2(fw, library_spectra(fw, lib))
                starts = distinct_best(chi_lib, lib, n_starts)
                p0 = np.concatenate([_default_params(names, lib[starts[:, k]]) for k in range(n_starts)])
            else:
                chi_lib = chi_lib_rvs + xp_chi2(fw, lib, np.linspace(0.0, 6.0, 25))
                starts = distinct_best(chi_lib, lib, max(1, n_starts - 1))
                first = _default_params(names, best_rvs[:, :5])
                for n in names:  # the RVS fit's spectral nuisances carry over
                    if n in rvs_names:
                        first[:, names.index(n)] = best_rvs[:, rvs_names.index(n)]
                p0 = np.concatenate([first] + [_default_params(names, lib[starts[:, k]]) for k in range(starts.shape[1])])
            rows = np.tile(np.arange(S), len(p0) // S)
            if fit == "all_inputs":
                p0 = nuisance_start(fw, p0, rows)
            p0 = np.clip(p0, lo, hi)
            log(f"  {fit}: {len(names)} free parameters ({', '.join(names)}), {len(p0) // S} starts per star")
            p, chi, its = levenberg_marquardt(fw, p0, rows, lo, hi, max_iter=MAX_ITER)
            chi = np.where(np.isfinite(chi), chi, np.inf).reshape(-1, S)
            best = np.argmin(chi, axis=0)
            pb = p.reshape(-1, S, len(names))[best, np.arange(S)]
            chib = chi[best, np.arange(S)]
            if fit == "rvs":
                best_rvs, rvs_names, chi_lib_rvs = pb, names, chi_lib
            results[fit] = pb[:, :5]
            per_star[fit] = {"labels": pb[:, :5].round(5).tolist(), "chi2": chib.round(3).tolist(),
                             "nuisances": {n: pb[:, k].round(5).tolist() for k, n in enumerate(names) if k >= 5}}
            secs = time.perf_counter() - t0
            red = chib / np.maximum(_n_data(fw) - len(names), 1)
            fits_meta[fit] = {"free": names, "starts": int(len(p0) // S), "seconds": round(secs, 1),
                              "median_reduced_chi2": float(np.median(red)),
                              "winning_start_counts": np.bincount(best, minlength=len(p0) // S).tolist(),
                              "iterations_median_max": [float(np.median(its)), int(its.max())],
                              "hit_iteration_cap": int((its >= MAX_ITER).sum())}
            log(f"  {fit}: {secs:.0f} s; median reduced chi2 {fits_meta[fit]['median_reduced_chi2']:.3f}; "
                f"winning start counts {fits_meta[fit]['winning_start_counts']}; iterations median "
                f"{np.median(its):.0f}, {fits_meta[fit]['hit_iteration_cap']} fits at the cap")
    y = truth.loc[sid, list(LABELS)].to_numpy(float)
    out = {"rvs": {}, "all_inputs": {}, "n": {}, "bias_rvs": {}, "bias_all_inputs": {}}
    for j, lab in enumerate(LABELS):
        for name, lo_, hi_ in BINS:
            sel = (snr >= lo_) & (snr < hi_) & np.isfinite(y[:, j])
            key = f"{lab}|{name}"
            out["n"][key] = int(sel.sum())
            if not sel.any():
                continue
            w = weight[sel] / weight[sel].sum() if name == "all" else np.full(sel.sum(), 1.0 / sel.sum())
            for fit in ("rvs", "all_inputs"):
                d = results[fit][sel, j] - y[sel, j]
                out[fit][key] = float(np.sqrt(np.sum(w * d * d)))
                out[f"bias_{fit}"][key] = float(np.sum(w * d))
    out["meta"] = {"work": str(work), "stars": int(S), "seed": seed, "realism": realism.model_dump(),
                   "fits": fits_meta, "seconds": round(time.perf_counter() - t_start, 1),
                   "read_seconds": round(t_read, 1), "library": int(len(lib)),
                   "strata": {n: int((stratum == k).sum()) for k, (n, _, _) in enumerate(STRATA)},
                   "all_weighting": "population share of each S/N stratum (<15, 15-25, 25-50, >50)"}
    out["per_star"] = {"source_id": sid.tolist(), "snr": snr.round(2).tolist(), "weight": weight.round(8).tolist(),
                       "truth": y.round(5).tolist(), **per_star}
    return out


def check_truth(work: Path, n: int = 40, overrides: list[str] | None = None, seed: int = 0) -> dict:
    """The model at the true labels and nuisances for ``n`` in-distribution stars: reduced chi-square of
    the spectrum and of the XP coefficients, the parallax chi-square, and how far the A_V and distance
    the all-inputs fit derives from the photometry are from the truth's (the RV residual and wiggle
    terms, which the truth table does not keep, at 0; the A_V ratio is the one the truth's distance
    implies)."""
    import pyarrow.parquet as pq

    from stellar.numerics import one_blas_thread
    from stellar.synth.population import absolute_g

    with one_blas_thread():
        cfg, inst, stats, realism, _, factor = _setup(work, overrides)
        truth = pq.read_table(Path(cfg.synth.output_dir) / "truth").to_pandas().set_index("source_id")
        sid, snr, stratum, weight = choose_stars(Path(cfg.preprocess.output_dir), truth, n, seed)
        st = load_stars(cfg, stats, sid, snr, stratum, weight)
        t = truth.loc[sid]
        rows = np.arange(sid.size)
        names, _, _ = param_layout(realism, True)
        fw = Forward(inst, realism, st, factor, names, use_aux=True)
        p = np.zeros((sid.size, len(names)))
        for k in (*LABELS, "vbroad"):
            p[:, fw.ix[k]] = t[k].to_numpy(float)
        mass, av = t["mass"].to_numpy(float), t["a_v"].to_numpy(float)
        p[:, fw.ix["log_mass"]] = np.log10(mass)
        mu_true = 5.0 * np.log10(t["distance_pc"].to_numpy(float)) - 5.0
        mg = absolute_g(t["teff"].to_numpy(float), t["logg"].to_numpy(float), mass)
        p[:, fw.ix["av_ratio"]] = (st.mags[:, 0] - mg - mu_true - G_PER_AV * av) / ((A_G_PER_AV - G_PER_AV) * av)
        av_derived = fw.a_v(p, rows)
        r = fw.residuals(p, rows)
        nb = fw.nb
        nspec = (fw.count > 0).sum(axis=1)
        xp = r[:, nb + 1: nb + 111]
        nxp = 55 * sum(np.isfinite(st.xp[b][1][:, 0]).astype(int) for b in ("bp", "rp"))
        blocks = {"spectrum_reduced_chi2": (r[:, :nb] ** 2).sum(axis=1) / nspec,
                  "xp_reduced_chi2": (xp**2).sum(axis=1) / nxp,
                  "parallax_chi2": r[:, -1] ** 2,
                  "abs_av_derived_minus_true": np.abs(av_derived - av),
                  "abs_mu_derived_minus_true": np.abs(fw.mu(p, rows) - mu_true),
                  "av_ratio_implied": p[:, fw.ix["av_ratio"]]}
        free = [n for n in names if n in ("rv", "log_mass", "av_ratio") or n.startswith("wig")]
        if any(n == "rv" or n.startswith("wig") for n in free):  # nuisances the truth does not keep: fit them alone
            _, lo, hi = param_layout(realism, True)
            fixed = np.array([n not in free for n in names])
            lo_s = np.where(fixed, p, lo[None, :])
            hi_s = np.where(fixed, p, hi[None, :])
            pf = p.copy()
            for b in range(sid.size):  # per-star bounds: one star at a time (cheap, n is small)
                pf[b:b + 1] = levenberg_marquardt(fw, p[b:b + 1], rows[b:b + 1], lo_s[b], hi_s[b], max_iter=60)[0]
            rf = fw.residuals(pf, rows)
            blocks["spectrum_reduced_chi2_unkept_nuisances_fitted"] = (rf[:, :nb] ** 2).sum(axis=1) / nspec
        out = {k: {"median": float(np.median(v)), "mean": float(np.mean(v)), "min": float(np.min(v)),
                   "max": float(np.max(v))} for k, v in blocks.items()}
        out["per_star_spectrum_reduced_chi2"] = np.round(blocks["spectrum_reduced_chi2"], 3).tolist()
        out["snr"] = np.round(snr, 1).tolist()
        return out


def print_table(res: dict) -> None:
    m = res["meta"]
    print(f"physical limit ({m['work']}): {m['stars']} stars (strata {m['strata']}), seed {m['seed']}, "
          f"{m['seconds']:.0f} s; starts {m['fits']['rvs']['starts']} (rvs) / {m['fits']['all_inputs']['starts']} (all)")
    print(f"{'label':<8}{'S/N':>7}{'n':>6} | {'RVS rmse':>10}{'bias':>10} | {'all rmse':>10}{'bias':>10}")
    for lab in LABELS:
        for name, _, _ in BINS:
            key = f"{lab}|{name}"
            if key not in res["rvs"]:
                continue
            fmt = (lambda x: f"{x:10.1f}") if lab == "teff" else (lambda x: f"{x:10.4f}")
            print(f"{lab:<8}{name:>7}{res['n'][key]:>6} | {fmt(res['rvs'][key])}{fmt(res['bias_rvs'][key])} | "
                  f"{fmt(res['all_inputs'][key])}{fmt(res['bias_all_inputs'][key])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a finished pipeline run folder")
    ap.add_argument("--stars", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--starts", type=int, default=4, help="starts per star and fit")
    ap.add_argument("--library", type=int, default=3000, help="library spectra that choose the starts")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--check-truth", type=int, default=0, metavar="N",
                    help="only print the reduced chi-square at the true parameters for N stars")
    args = ap.parse_args()
    if args.check_truth:
        print(json.dumps(check_truth(Path(args.work), args.check_truth, args.set, args.seed), indent=1))
        return
    res = physical_limit(Path(args.work), args.stars, args.seed, args.set, n_starts=args.starts, library=args.library)
    print_table(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
