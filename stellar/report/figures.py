"""The report's figures: each one a function of the page's inputs that saves its PNG, appends
(file, title, caption) to the page's figure list and records the numbers it plots in the page's data
(``report.json``), so tests and users check content, not pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from stellar.config import StellarConfig
from stellar.ensemble import SNR_BINS
from stellar.errors import StellarError
from stellar.figures import coverage_figure
from stellar.tables import TableStore, read_table

R_BINS = ((0.0, 7.0), (7.0, 9.0), (9.0, 20.0))  # kpc
Z_BINS = ((0.0, 0.5), (0.5, 1.0), (1.0, 3.0))  # kpc
# [M/H] range where thin- and thick-disc sequences overlap: the [alpha/M] histogram there is bimodal
BIMODAL_MH = (-0.7, -0.2)
ALPHA_EDGES = np.linspace(-0.2, 0.5, 36)
UNITS = {"teff": "K", "logg": "dex", "m_h": "dex", "alpha_m": "dex", "fe_h": "dex", "a_li": "dex"}
# how a label is written on an axis: its symbol, and its unit (log g: the logarithm of g in cm s^-2)
SYMBOLS = {"teff": r"$T_\mathrm{eff}$", "logg": r"$\log g$", "m_h": "[M/H]", "alpha_m": r"[$\alpha$/M]",
           "fe_h": "[Fe/H]", "a_li": "A(Li)"}
AXIS_UNITS = {"teff": "K", "logg": r"dex, $g$ in cm s$^{-2}$", "m_h": "dex", "alpha_m": "dex", "fe_h": "dex",
              "a_li": "dex"}
DPI = 200  # PNG resolution; every figure is also written as PDF (vector) beside it


def symbol(lab: str) -> str:
    """The label as a reader writes it ("[M/H]", "T_eff" in mathtext), for legends and titles."""
    return SYMBOLS.get(lab, lab)


def axis_label(lab: str, what: str = "") -> str:
    """An axis label with the physical unit: ``axis_label("logg", "predicted")`` ->
    "predicted log g (dex, g in cm s^-2)"."""
    return f"{what + ' ' if what else ''}{symbol(lab)} ({AXIS_UNITS.get(lab, UNITS.get(lab, ''))})"


def _label_grid(plt, n: int, width: float, height: float):
    """One panel per label, three to a row (``width`` x ``height`` inches each), unused panels hidden:
    the figure and the label panels in order."""
    ncol = min(3, n)
    nrow = -(-n // ncol)
    fig, grid = plt.subplots(nrow, ncol, figsize=(width * ncol, height * nrow), squeeze=False, layout="constrained")
    panels = list(grid.flat)
    for ax in panels[n:]:
        ax.set_visible(False)
    return fig, panels[:n]


def _log_snr_axis(ax) -> None:
    """A log S/N axis with plain tick labels at readable values and no overprinting minor labels."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([10, 15, 25, 50, 100, 200, 500]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


@dataclass
class Page:
    """What every figure of one report reads and adds to.

    Attributes:
        cfg: the run's settings (the stores the figures read).
        out: the report folder (PNGs go there).
        labels: the model's labels.
        preds: the predictions (pandas); ``ok`` rows have no problem, ``like`` are also train-like.
        feats: the labelled stars' labels and label errors from the features (split, labels, *_err).
        data: the numbers behind the figures (``report.json``).
        figures: (file, title, caption) of each figure drawn, in page order.
        plt: matplotlib.pyplot on the Agg backend.
    """

    cfg: StellarConfig
    out: Path
    labels: list[str]
    preds: Any
    ok: np.ndarray
    like: np.ndarray
    feats: Any
    data: dict = field(default_factory=dict)
    figures: list[tuple[str, str, str]] = field(default_factory=list)
    plt: Any = None


def galactocentric(ra: np.ndarray, dec: np.ndarray, parallax_mas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Galactocentric cylindrical R and Z (kpc) from ra/dec (deg) and parallax (mas), astropy's frame."""
    import astropy.units as u
    from astropy.coordinates import Galactocentric, SkyCoord

    c = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, distance=(1.0 / parallax_mas) * u.kpc)
    g = c.transform_to(Galactocentric())
    return np.hypot(g.x.to_value(u.kpc), g.y.to_value(u.kpc)), g.z.to_value(u.kpc)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.labelsize": 9, "axes.titlesize": 9, "legend.fontsize": 8,
                         "xtick.labelsize": 8, "ytick.labelsize": 8, "savefig.bbox": "tight",
                         "pdf.fonttype": 42})  # TrueType in the PDF: journals and editors take it
    return plt


def _save(fig, path: Path) -> str:
    """The figure as a 200 dpi PNG (the page shows it) and a PDF beside it (for papers); returns the PNG's name."""
    fig.savefig(path, dpi=DPI)
    fig.savefig(path.with_suffix(".pdf"))
    _plt().close(fig)
    return path.name


def bimodality(counts: np.ndarray, edges: np.ndarray = ALPHA_EDGES, min_sep: float = 0.1) -> dict:
    """The two highest maxima of the smoothed histogram at least ``min_sep`` apart and the depth of the
    dip between them (dip / lower peak: 1 = no dip). A two-sequence disc gives a dip well below 1."""
    c = np.convolve(np.asarray(counts, dtype=float), np.ones(3) / 3, mode="same")
    centres = 0.5 * (edges[1:] + edges[:-1])
    maxima = [i for i in range(1, len(c) - 1) if c[i] > c[i - 1] and c[i] >= c[i + 1] and c[i] > 0]
    best = None
    for a in maxima:
        for b in maxima:
            if centres[b] - centres[a] >= min_sep:
                dip = c[a:b + 1].min() / min(c[a], c[b])
                if best is None or min(c[a], c[b]) > best[3]:
                    best = (a, b, dip, min(c[a], c[b]))
    if best is None:
        return {"peaks": [], "dip_ratio": 1.0}
    a, b, dip, _ = best
    return {"peaks": [float(centres[a]), float(centres[b])], "dip_ratio": float(dip)}


def kiel(page: Page) -> None:
    """Kiel diagram (Teff-log g coloured by [M/H]) of the train-like stars."""
    (out, labels, preds, like, data, figures, plt) = \
        (page.out, page.labels, page.preds, page.like, page.data, page.figures, page.plt)
    if {"teff", "logg", "m_h"} <= set(labels):
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        p = preds[like]
        sc = ax.scatter(p["teff"], p["logg"], c=p["m_h"], s=2, cmap="viridis", vmin=-2, vmax=0.5, rasterized=True)
        fig.colorbar(sc, label=axis_label("m_h", "predicted"))
        ax.invert_xaxis()
        ax.invert_yaxis()
        ax.set_xlabel(axis_label("teff", "predicted"))
        ax.set_ylabel(axis_label("logg", "predicted"))
        ax.set_title(f"Kiel diagram, {len(p)} train-like stars")
        figures.append((_save(fig, out / "kiel.png"), "Kiel diagram",
                        "Predicted Teff and log g of the train-like stars, coloured by predicted [M/H]: the main "
                        "sequence, turn-off and red-giant branch should be sharp, metal-poor giants bluer."))
        data["kiel"] = {"n": int(len(p))}



def alpha_mh(page: Page) -> None:
    """[alpha/M] vs [M/H] in bins of Galactocentric R and |Z|, and the [alpha/M] histogram at fixed [M/H]
    beside the training labels'."""
    (cfg, out, labels, preds, like, feats, data, figures, plt) = \
        (page.cfg, page.out, page.labels, page.preds, page.like, page.feats, page.data, page.figures, page.plt)
    if {"alpha_m", "m_h"} <= set(labels):
        ast = read_table(cfg.ingest.output_dir, "astrometry", ["source_id", "ra", "dec", "parallax",
                                                                "parallax_error"]).to_pandas()
        m = preds[like].merge(ast, on="source_id", how="inner")
        good = (m["parallax"] > 0) & (m["parallax"] > 5 * m["parallax_error"])
        m = m[good.to_numpy()]
        r, z = galactocentric(m["ra"].to_numpy(), m["dec"].to_numpy(), m["parallax"].to_numpy())
        from matplotlib.colors import LogNorm

        fig, axes = plt.subplots(len(Z_BINS), len(R_BINS), figsize=(10, 8.5), sharex=True, sharey=True,
                                 squeeze=False)
        panels = []
        image = None
        norm = LogNorm(vmin=1, vmax=max(10, len(m) // 50))  # one colour scale for every panel
        for i, (z0, z1) in enumerate(reversed(Z_BINS)):
            for j, (r0, r1) in enumerate(R_BINS):
                sel = (r >= r0) & (r < r1) & (np.abs(z) >= z0) & (np.abs(z) < z1)
                ax = axes[i, j]
                mh, am = m["m_h"].to_numpy()[sel], m["alpha_m"].to_numpy()[sel]
                if sel.sum() > 0:
                    *_, image = ax.hist2d(mh, am, bins=[np.linspace(-2.0, 0.6, 53), ALPHA_EDGES], cmap="viridis",
                                          cmin=1, norm=norm, rasterized=True)
                ax.text(0.03, 0.95, f"$R$ {r0:g}-{r1:g} kpc, $|Z|$ {z0:g}-{z1:g} kpc\n$n$ = {int(sel.sum())}",
                        transform=ax.transAxes, fontsize=9, va="top")
                band = (mh >= BIMODAL_MH[0]) & (mh < BIMODAL_MH[1])
                counts, _ = np.histogram(am[band], bins=ALPHA_EDGES)
                panels.append({"r": [r0, r1], "abs_z": [z0, z1], "n": int(sel.sum()), "alpha_hist": counts.tolist(),
                               "bimodality": bimodality(counts)})
                if i == len(Z_BINS) - 1:
                    ax.set_xlabel(axis_label("m_h", "predicted"))
                if j == 0:
                    ax.set_ylabel(axis_label("alpha_m", "predicted"))
        fig.tight_layout()
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.6, label="stars per bin (log scale)")
        figures.append((_save(fig, out / "alpha_mh.png"), "[alpha/M] vs [M/H] across the disc",
                        "Train-like stars with parallax/error > 5, in bins of Galactocentric R and |Z| (astropy): "
                        "the low- and high-[alpha/M] (thin- and thick-disc) sequences should be separate in every "
                        "panel, each panel's mix of them being the population's own."))
        counts, _ = np.histogram(m["alpha_m"].to_numpy()[(m["m_h"] >= BIMODAL_MH[0]).to_numpy()
                                                         & (m["m_h"] < BIMODAL_MH[1]).to_numpy()], bins=ALPHA_EDGES)
        data["alpha_mh"] = {"alpha_edges": ALPHA_EDGES.tolist(), "mh_band": list(BIMODAL_MH), "panels": panels,
                            "all": {"alpha_hist": counts.tolist(), "bimodality": bimodality(counts),
                                    "n": int(len(m))}}

        # the same band as a 1-D histogram, predictions beside the training labels they learnt from
        labelled = feats[(feats["split"] != "observed").to_numpy()
                         & np.isfinite(feats["alpha_m"].to_numpy(dtype=float))]
        in_band = (labelled["m_h"] >= BIMODAL_MH[0]).to_numpy() & (labelled["m_h"] < BIMODAL_MH[1]).to_numpy()
        lab_counts, _ = np.histogram(labelled["alpha_m"].to_numpy(dtype=float)[in_band], bins=ALPHA_EDGES)
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        centres = 0.5 * (ALPHA_EDGES[1:] + ALPHA_EDGES[:-1])
        width = ALPHA_EDGES[1] - ALPHA_EDGES[0]
        for c, name, style in ((counts, f"predicted, train-like stars (n={int(counts.sum())})", "C0"),
                               (lab_counts, f"training labels (n={int(lab_counts.sum())})", "C3")):
            ax.step(centres, c / max(c.sum(), 1) / width, where="mid", color=style, label=name)
        ax.set_xlabel(axis_label("alpha_m"))
        ax.set_ylabel("probability density (dex$^{-1}$)")
        ax.set_title(f"{symbol('alpha_m')} for {BIMODAL_MH[0]} < [M/H] < {BIMODAL_MH[1]}")
        ax.legend()
        fig.tight_layout()
        figures.append((_save(fig, out / "alpha_hist.png"), "[alpha/M] distribution at fixed [M/H]",
                        "Where the thin- and thick-disc sequences overlap in [M/H], [alpha/M] separates them: the "
                        "training labels show two peaks, and the predictions should too; a single blurred peak "
                        "means the model does not read [alpha/M] from the spectrum itself."))
        data["alpha_mh"]["training_labels"] = {"alpha_hist": lab_counts.tolist(), "bimodality": bimodality(lab_counts),
                                               "n": int(in_band.sum())}



def _test_stars(page: Page):
    """The test split's labelled stars with their predictions (label columns suffixed ``_label``)."""
    return page.feats[page.feats["split"] == "test"].merge(page.preds[page.ok], on="source_id",
                                                           suffixes=("_label", ""))


def accuracy_table(test, labels: list[str]) -> list[dict]:
    """Per label and S/N bin (all, 15-25, 25-50, > 50) on the test split: stars, bias, RMSE, robust scatter
    (1.4826 MAD), the z-score spread (std of residual / sqrt(sigma^2 + label error^2): 1 when calibrated)
    and the share inside the 68 % interval: the page's accuracy and calibration tables."""
    rows = []
    snr = test["snr"].to_numpy(dtype=float)
    for lab in labels:
        y = test[f"{lab}_label"].to_numpy(dtype=float)
        p = test[lab].to_numpy(dtype=float)
        sig = np.hypot(test[f"{lab}_err"].to_numpy(dtype=float),
                       np.nan_to_num(test[f"{lab}_err_label"].to_numpy(dtype=float)))
        fin = np.isfinite(y) & np.isfinite(p) & np.isfinite(sig)
        for name, (lo, hi) in (("all", (0.0, np.inf)), *((f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">{lo:g}",
                                                           (lo, hi)) for lo, hi in SNR_BINS)):
            sel = fin & (snr >= lo) & (snr < hi)
            r = p[sel] - y[sel]
            z = r / sig[sel]
            n = int(sel.sum())
            rows.append({"label": lab, "snr": name, "n": n,
                         "bias": float(np.mean(r)) if n else None,
                         "rmse": float(np.sqrt(np.mean(r**2))) if n else None,
                         "robust_scatter": float(1.4826 * np.median(np.abs(r - np.median(r)))) if n else None,
                         "z_spread": float(np.std(z)) if n > 1 else None,
                         "coverage68": float(np.mean(np.abs(z) < 0.9945)) if n else None})
    return rows


def one_to_one(page: Page) -> None:
    """Predicted against catalogue label per label on the test split, coloured by S/N, with the 1:1 line
    and each panel's bias and RMSE."""
    labels, data, figures, plt = page.labels, page.data, page.figures, page.plt
    test = _test_stars(page)
    if not len(test):
        return
    from matplotlib.colors import LogNorm

    fig, panels = _label_grid(plt, len(labels), 4.0, 3.7)
    stats = {}
    sc = None
    for ax, lab in zip(panels, labels):
        y = test[f"{lab}_label"].to_numpy(dtype=float)
        p = test[lab].to_numpy(dtype=float)
        fin = np.isfinite(y) & np.isfinite(p)
        lo, hi = np.percentile(np.r_[y[fin], p[fin]], [0.5, 99.5]) if fin.any() else (0.0, 1.0)
        pad = 0.05 * (hi - lo)
        sc = ax.scatter(y[fin], p[fin], c=test["snr"].to_numpy(dtype=float)[fin], s=3, cmap="viridis",
                        norm=LogNorm(vmin=10, vmax=300), rasterized=True)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k-", lw=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_xlabel(axis_label(lab, "catalogue"))
        ax.set_ylabel(axis_label(lab, "predicted"))
        r = p[fin] - y[fin]
        stats[lab] = {"n": int(fin.sum()), "bias": float(np.mean(r)) if fin.any() else None,
                      "rmse": float(np.sqrt(np.mean(r**2))) if fin.any() else None}
        unit = UNITS.get(lab, "")
        fmt = ".0f" if lab == "teff" else ".3f"
        if fin.any():
            ax.text(0.04, 0.96, f"$n$ = {stats[lab]['n']}\nbias {stats[lab]['bias']:{fmt}} {unit}\n"
                    f"RMSE {stats[lab]['rmse']:{fmt}} {unit}", transform=ax.transAxes, va="top", fontsize=8)
    if sc is not None:
        fig.colorbar(sc, ax=panels, shrink=0.6, label="S/N per pixel")
    figures.append((_save(fig, page.out / "one_to_one.png"), "Predicted vs catalogue labels (test split)",
                    "Each held-out labelled star's predicted label against its catalogue label, coloured by S/N, "
                    "with the one-to-one line; the numbers are the panel's bias and RMSE (the tables below split "
                    "them by S/N)."))
    data["one_to_one"] = stats
    data["accuracy"] = accuracy_table(test, labels)


def residuals_snr(page: Page) -> None:
    """Residuals against S/N per label and the calibration (coverage) curves, on the test split."""
    (out, labels, data, figures, plt) = (page.out, page.labels, page.data, page.figures, page.plt)
    test = _test_stars(page)
    if len(test):
        from stellar.ensemble import COVERAGE_LEVELS as qs
        from stellar.ensemble import coverage_curve

        fig, panels = _label_grid(plt, len(labels), 3.8, 2.9)
        res_data, cal_data = {}, {}
        for ax, lab in zip(panels, labels):
            y = test[f"{lab}_label"].to_numpy(dtype=float)
            fin = np.isfinite(y)
            r = test[lab].to_numpy(dtype=float)[fin] - y[fin]
            snr = test["snr"].to_numpy(dtype=float)[fin]
            ax.scatter(snr, r, s=3, alpha=0.5, rasterized=True)
            ax.axhline(0, color="k", lw=0.8)
            _log_snr_axis(ax)
            ax.set_xlabel("S/N per pixel")
            ax.set_ylabel(f"{symbol(lab)} predicted $-$ catalogue ({UNITS.get(lab, '')})")
            err = np.sqrt(test[f"{lab}_err"].to_numpy(dtype=float)[fin] ** 2
                          + np.nan_to_num(test[f"{lab}_err_label"].to_numpy(dtype=float)[fin]) ** 2)
            zs = r / err
            cover = coverage_curve(zs)
            res_data[lab] = {"n": int(fin.sum()), "rmse": float(np.sqrt(np.mean(r**2))), "bias": float(np.mean(r))}
            cal_data[lab] = {"expected": qs.round(3).tolist(), "observed": cover}
        figc = coverage_figure({symbol(lab): c["observed"] for lab, c in cal_data.items()},
                               "observed coverage (test split)")
        figures.append((_save(fig, out / "residuals_snr.png"), "Residuals vs S/N (test split)",
                        "Prediction minus label for held-out labelled stars: the scatter should shrink with S/N "
                        "and scatter about zero."))
        figures.append((_save(figc, out / "calibration.png"), "Calibration curves (test split)",
                        "Share of test stars whose label lies within the predicted interval, against the "
                        "interval's nominal coverage: on the diagonal when the uncertainties are calibrated. "
                        "The test stars are half of the stars the published calibration is fitted on, so this "
                        "is a check of its fit; the held-out figure is the training run's (the test stars "
                        "judged before they joined it: the MLflow run's metrics and the promotion gate)."))
        data["residuals"] = res_data
        data["calibration"] = cal_data



def selection_map(page: Page) -> None:
    """The selection map: training, observed train-like and train-unlike stars."""
    cfg, out, data, figures, plt = page.cfg, page.out, page.data, page.figures, page.plt
    sstore = TableStore(cfg.select.output_dir)
    if sstore.current_version() is not None:
        sel = read_table(cfg.select.output_dir, "selection", ["x", "y", "train_like", "split"]).to_pandas()
        tr = (sel["split"] == "train").to_numpy()
        sl = sel["train_like"].to_numpy(dtype=bool)
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.scatter(sel["x"][~tr & sl], sel["y"][~tr & sl], s=1, c="0.7", label="observed, train-like")
        ax.scatter(sel["x"][tr], sel["y"][tr], s=1, c="C0", label="training")
        ax.scatter(sel["x"][~tr & ~sl], sel["y"][~tr & ~sl], s=1, c="C3", label="observed, train-unlike")
        ax.legend(markerscale=8)
        method = (sstore.current_manifest() or {}).get("summary", {}).get("method", "t-SNE")
        method = {"tsne": "t-SNE", "umap": "UMAP"}.get(str(method).lower(), str(method))
        ax.set_xlabel(f"{method} coordinate 1 (arbitrary units)")
        ax.set_ylabel(f"{method} coordinate 2 (arbitrary units)")
        ax.set_title(f"selection map ({method} of PCA-reduced spectra)")
        figures.append((_save(fig, out / "selection_map.png"), "Selection map",
                        "The t-SNE/UMAP map of training and observed spectra; observed stars far from training "
                        "stars (red) are flagged train-unlike and their labels should not be trusted."))
        data["selection"] = {"training": int(tr.sum()), "observed_train_like": int((~tr & sl).sum()),
                             "observed_train_unlike": int((~tr & ~sl).sum())}



def _ensemble(cfg: StellarConfig, model: dict):
    """The predictions' registered ensemble, or None where it cannot be loaded (figures then skipped)."""
    from stellar.registry import load_registered

    try:
        return load_registered(cfg, str(model["version"]))[0]
    except (StellarError, KeyError):
        return None


def _features_of(cfg: StellarConfig, ids: np.ndarray, columns: list[str]):
    import pyarrow as pa
    import pyarrow.dataset as ds

    path = TableStore(cfg.preprocess.output_dir).table_path("features")
    return ds.dataset(path, format="parquet", partitioning="hive").to_table(
        columns=["source_id", *columns], filter=pc.field("source_id").isin(pa.array(np.asarray(ids, np.int64))))


def _lines(cfg: StellarConfig, wave: np.ndarray) -> list[tuple[str, float]]:
    from stellar.instruments import load_instrument

    try:
        return [(ln.species, ln.wavelength) for ln in load_instrument(cfg.instrument, cfg.conf_dir).lines
                if wave[0] <= ln.wavelength <= wave[-1] and ln.kind != "dib"]
    except StellarError:
        return []


RESIDUAL_STARS_PER_REASON = 2


def _residuals(cfg: StellarConfig, ens, preds, out: Path, labels: list[str]):
    """Observed spectra against the emulator at the predicted labels, for the most discrepant stars of
    each consistency reason (spectrum, lines, broadening), the lowest-scoring map-flagged star and a typical
    unflagged one; and, over all flagged stars shown, the share of the squared residual that falls in
    the strong-line windows (to set beside the saliency's share there)."""
    from stellar.trust import OOD_BITS

    if ens is None or ens.emulator is None or "spectrum_chi2" not in preds or not len(preds):
        return None, None
    reason = preds["ood_reason"].fillna(0).to_numpy(np.int64)
    chi2 = preds["spectrum_chi2"].to_numpy(dtype=float)
    sid = preds["source_id"].to_numpy(np.int64)
    has = np.isfinite(chi2) & preds[labels].notna().all(axis=1).to_numpy()
    picks: list[tuple[int, str]] = []
    broad = (preds["line_broadening"].to_numpy(dtype=float) if "line_broadening" in preds
             else np.full(len(preds), np.nan))  # predictions made before the broadening statistic
    for name in ("spectrum", "lines", "broadening", "map"):
        bit = OOD_BITS[name][0]
        cand = np.flatnonzero(has & ((reason & bit) != 0))
        key = {"map": preds["selection_score"].to_numpy(dtype=float)[cand],
               "broadening": -broad[cand]}.get(name, -chi2[cand])
        order = cand[np.lexsort((sid[cand], np.nan_to_num(key, nan=np.inf)))]
        shown = {p for p, _ in picks}  # a star flagged for several reasons is shown once
        picks += [(int(i), name) for i in [i for i in order if int(i) not in shown][:RESIDUAL_STARS_PER_REASON]]
    clean = np.flatnonzero(has & (reason == 0))
    if clean.size:
        picks.append((int(clean[np.argsort(chi2[clean], kind="stable")[clean.size // 2]]), "unflagged (median chi2)"))
    if not picks:
        return None, None
    feats = _features_of(cfg, sid[[i for i, _ in picks]], ["spectrum", "spectrum_error", "spectrum_mask"])
    n = feats.num_rows
    arr = {k: feats[k].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.float64)
           for k in ("spectrum", "spectrum_error", "spectrum_mask")}
    row = {int(v): j for j, v in enumerate(feats["source_id"].to_numpy())}
    wave = np.asarray(ens.stats["wavelength"])
    lines = _lines(cfg, wave)
    window = ens.emulator.window
    plt = _plt()
    fig, axes = plt.subplots(len(picks), 1, figsize=(10, 1.9 * len(picks)), sharex=True, squeeze=False)
    stars, flagged_r2 = [], []
    for ax, (i, why) in zip(axes[:, 0], picks):
        j = row.get(int(sid[i]))
        if j is None:
            continue
        z = (preds.iloc[i][labels].to_numpy(dtype=float) - ens.label_mean) / ens.label_std
        model_flux = ens.emulator.model(z[None, :])[0]
        f = np.where(arr["spectrum_mask"][j] == 0, arr["spectrum"][j], np.nan)
        resid = f - model_flux
        ax.plot(wave, f, lw=0.6, c="k", label="observed")
        ax.plot(wave, model_flux, lw=0.6, c="C1", label="emulated at the predicted labels")
        ax.plot(wave, resid + 0.35, lw=0.6, c="C3", label="observed - emulated, + 0.35")
        for name, w in lines:
            if name == "Ca II":
                ax.axvline(w, color="C0", lw=0.5, zorder=0)
        ax.set_ylim(0.2, 1.15)
        ax.set_ylabel("normalised flux")
        title = (f"Gaia DR3 {sid[i]}: {why}; {symbol('teff')} {preds.iloc[i]['teff']:.0f} K, {symbol('logg')} "
                 f"{preds.iloc[i]['logg']:.2f} dex, [M/H] {preds.iloc[i]['m_h']:.2f} dex; reduced $\\chi^2$ "
                 f"{chi2[i]:.2f} (spectrum), {preds.iloc[i]['line_chi2']:.2f} (lines); line broadening "
                 f"{broad[i]:.1f}")
        ax.set_title(title, fontsize=8, loc="left")
        smooth = np.convolve(np.nan_to_num(resid) ** 2, np.ones(5) / 5, mode="same")
        stars.append({"source_id": int(sid[i]), "shown_for": why, "spectrum_chi2": float(chi2[i]),
                      "ood_reason": int(reason[i]), "peak_residual_nm": float(wave[int(np.argmax(smooth))])})
        if why != "unflagged (median chi2)":
            flagged_r2.append(np.nan_to_num(resid) ** 2)
    axes[0, 0].legend(fontsize=7, loc="lower left", ncol=3)
    axes[-1, 0].set_xlabel("wavelength (nm); blue: Ca II triplet")
    fig.tight_layout()
    name = _save(fig, out / "residual_spectra.png")
    res = {"stars": stars, "window_pixel_share": float(window.mean())}
    if flagged_r2:
        r2 = np.sum(flagged_r2, axis=0)
        res["flagged_residual_share_in_line_windows"] = float(r2[window].sum() / max(r2.sum(), 1e-30))
    return (name, "Residual spectra of flagged stars",
            "Observed spectra against the consistency emulator evaluated at each star's predicted labels, for the "
            "most discrepant stars flagged by the spectrum and line tests, the lowest map scores, and a typical "
            "unflagged star. Doubled, shifted or missing lines show where a star differs from the training set; "
            "compare the share of residual in the line windows with the saliency's (report.json)."), res


def _saliency(cfg: StellarConfig, ens, ids: np.ndarray, out: Path, labels: list[str]):
    """Mean gradient of each label's ensemble mean with respect to the flux, over train-like stars."""
    import torch

    from stellar.inference_core import features_to_tensors
    from stellar.model import StackedEnsemble

    if not len(ids) or ens is None or not ens.cfg.use_spectrum:
        return None, None
    t = _features_of(cfg, ids, ["spectrum", "spectrum_mask", "xp", "scalars"]).drop(["source_id"])
    n = t.num_rows
    arrays = {k: t[k].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1) for k in t.column_names}
    data = features_to_tensors(ens.stats, arrays)
    net = StackedEnsemble(ens.nets).eval()
    spec = data["spectrum"].clone().requires_grad_(True)
    grads = []
    for j in range(len(labels)):
        mean, _ = net(spec, data["spectrum_mask"], data["xp"], data["scalars"])
        (g,) = torch.autograd.grad(mean[..., j].mean(), spec)
        grads.append((g * n * ens.label_std[j]).mean(dim=0).numpy())  # physical units per unit flux
    wave = np.asarray(ens.stats["wavelength"])
    lines = _lines(cfg, wave)
    plt = _plt()
    fig, axes = plt.subplots(len(labels), 1, figsize=(10, 1.6 * len(labels)), sharex=True, squeeze=False)
    for j, lab in enumerate(labels):
        ax = axes[j, 0]
        ax.plot(wave, grads[j], lw=0.7)
        for name, w in lines:
            ax.axvline(w, color="C3" if name == "Ca II" else "0.8", lw=0.6 if name == "Ca II" else 0.4, zorder=0)
        ax.set_ylabel(f"$\\partial${symbol(lab)} / $\\partial$flux\n({UNITS.get(lab, '')} per unit flux)", fontsize=8)
    axes[-1, 0].set_xlabel("wavelength (nm); red: Ca II triplet, grey: other lines of the instrument preset")
    fig.tight_layout()
    name = _save(fig, out / "saliency.png")
    ca = [w for s, w in lines if s == "Ca II"]
    sal = {"n_stars": n, "wavelength": [float(wave[0]), float(wave[-1])],
           "peak_wavelength": {lab: float(wave[int(np.argmax(np.abs(grads[j])))]) for j, lab in enumerate(labels)},
           "ca_triplet": ca}
    if ens.emulator is not None:  # share of |saliency| in the strong-line windows, beside the residuals'
        # each label's |saliency| normalised to unit sum before averaging: in physical units the Teff
        # derivative (K per unit flux) would outweigh the abundances', whose information sits in the lines
        tot = np.mean([np.abs(g) / max(float(np.abs(g).sum()), 1e-30) for g in grads], axis=0)
        sal["share_in_line_windows"] = float(tot[ens.emulator.window].sum())
        sal["share_in_line_windows_per_label"] = {
            lab: float(np.abs(grads[j])[ens.emulator.window].sum() / max(float(np.abs(grads[j]).sum()), 1e-30))
            for j, lab in enumerate(labels)}
        sal["window_pixel_share"] = float(ens.emulator.window.mean())
    return (name, "Saliency", "Mean derivative of each predicted label with respect to the flux of each pixel, over "
            "train-like stars: where in the spectrum the network looks (Ca II triplet in red)."), sal

