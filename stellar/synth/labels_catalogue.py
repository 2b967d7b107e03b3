"""APOGEE DR17 allStar-like training labels for the synthetic survey.

Which stars get labels mimics a higher-resolution survey's selection (giants
favoured over dwarfs, out-of-distribution stars never); measured labels are
truth plus Gaussian noise whose standard deviation grows as the label
survey's S/N falls and is reported in the ``*_ERR`` columns; a share of rows
carry ASPCAP's STAR_BAD bit with much larger errors, and low-S/N or
bright-neighbour rows carry STARFLAG bits, so quality cuts have work to do.
Columns and FITS formats follow the real allStar DR17 file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from stellar.synth.population import GRVS_BRIGHTEST, GRVS_COUNT_SLOPE, OOD_NONE

ASPCAP_STAR_BAD = 23
STARFLAG_BRIGHT_NEIGHBOR = 2
STARFLAG_LOW_SNR = 4
STARFLAG_NAMES = {STARFLAG_BRIGHT_NEIGHBOR: "BRIGHT_NEIGHBOR", STARFLAG_LOW_SNR: "LOW_SNR"}
# Label noise at APOGEE S/N = 100; scales as sqrt(100 / SNR).
LABEL_NOISE = {"teff": 40.0, "logg": 0.06, "m_h": 0.03, "alpha_m": 0.025, "fe_h": 0.03, "a_li": 0.10}
# canonical label -> allStar column
ALLSTAR_COLUMN = {"teff": "TEFF", "logg": "LOGG", "m_h": "M_H", "alpha_m": "ALPHA_M", "fe_h": "FE_H", "a_li": "A_LI"}


def brightness_weight(grvs: np.ndarray, grvs_limit: float, snr_power: float) -> np.ndarray:
    """A star's relative chance of a label for its brightness: (S/N / S/N at the limit) ** ``snr_power``,
    i.e. 10^(-0.2 snr_power (G_RVS - limit)), divided by its mean over the sample's magnitude distribution
    (counts ~ 10^(GRVS_COUNT_SLOPE m) between GRVS_BRIGHTEST and the limit), so the share of labelled
    stars stays what ``fraction`` says. The mean is computed, not taken over the stars at hand, so a
    star's chance does not depend on which file it was generated in."""
    if snr_power == 0:
        return np.ones_like(grvs, dtype=np.float64)
    a = GRVS_COUNT_SLOPE * np.log(10.0)
    c = 0.2 * snr_power * np.log(10.0)
    span = grvs_limit - GRVS_BRIGHTEST
    # mean of exp(-c x) for x = m - limit with density a exp(a x) / (1 - exp(-a span)) on [-span, 0]
    mean = (a * span if np.isclose(a, c) else a / (a - c) * (1.0 - np.exp(-(a - c) * span))) / (1.0 - np.exp(-a * span))
    return np.exp(-c * (np.asarray(grvs, dtype=np.float64) - grvs_limit)) / mean


def choose_training(rng: np.random.Generator, pop: dict, fraction: float, grvs_limit: float,
                    snr_power: float = 0.0) -> np.ndarray:
    """Which stars get training labels: about ``fraction`` of them, giants 1.4x and dwarfs 0.6x as likely
    (a higher-resolution survey's selection), brighter ones more likely with ``snr_power`` > 0
    (:func:`brightness_weight`; capped at certainty), never an out-of-distribution star."""
    giant = pop["stage"] >= 2
    p = np.clip(fraction * np.where(giant, 1.4, 0.6) * brightness_weight(pop["grvs_mag"], grvs_limit, snr_power),
                0.0, 1.0)
    return (rng.random(p.size) < p) & (pop["ood_kind"] == OOD_NONE)


def measure_labels(rng: np.random.Generator, pop: dict, labelled: np.ndarray, bad_fraction: float,
                   labels: list[str]) -> dict[str, np.ndarray]:
    """Measured labels, errors and flags for every star (NaN / 0 where not labelled)."""
    n = labelled.size
    snr = np.clip(rng.lognormal(np.log(120.0), 0.6, n), 20.0, 1500.0)
    scale = np.clip(np.sqrt(100.0 / snr), 0.5, 3.0)
    bad = labelled & (rng.random(n) < bad_fraction)
    out: dict[str, np.ndarray] = {"snr": np.where(labelled, snr, np.nan).astype(np.float32)}
    for lab in labels:
        sigma = LABEL_NOISE[lab] * scale
        noise = sigma * rng.standard_normal(n) * np.where(bad, 6.0, 1.0)
        out[lab] = np.where(labelled, pop[lab] + noise, np.nan).astype(np.float32)
        out[f"{lab}_err"] = np.where(labelled, sigma, np.nan).astype(np.float32)
    aspcap = np.where(bad, 1 << ASPCAP_STAR_BAD, 0).astype(np.int64)
    starflag = np.zeros(n, dtype=np.int64)
    starflag |= np.where(labelled & (snr < 50), 1 << STARFLAG_LOW_SNR, 0)
    starflag |= np.where(labelled & (rng.random(n) < 0.01), 1 << STARFLAG_BRIGHT_NEIGHBOR, 0)
    out["aspcapflag"] = np.where(labelled, aspcap, 0)
    out["starflag"] = starflag
    return out


def apogee_ids(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """2MASS-style designations ``2MHHMMSSss+DDMMSSs`` from coordinates, vectorised."""
    h = ra / 15.0
    hh = np.floor(h).astype(int)
    mm = np.floor((h - hh) * 60).astype(int)
    ss = np.floor(((h - hh) * 60 - mm) * 60 * 100).astype(int)
    sign = np.where(dec < 0, "-", "+")
    ad = np.abs(dec)
    dd = np.floor(ad).astype(int)
    dm = np.floor((ad - dd) * 60).astype(int)
    ds = np.floor(((ad - dd) * 60 - dm) * 60 * 10).astype(int)
    parts = [np.char.zfill(x.astype(str), w) for x, w in ((hh, 2), (mm, 2), (ss, 4))]
    dparts = [np.char.zfill(x.astype(str), w) for x, w in ((dd, 2), (dm, 2), (ds, 3))]
    out = np.char.add("2M", parts[0])
    for p in parts[1:] + [sign] + dparts:
        out = np.char.add(out, p)
    return out


def _flag_names(bits: np.ndarray, names: dict[int, str]) -> np.ndarray:
    out = np.full(bits.size, "", dtype=object)
    for bit, name in names.items():
        has = (bits >> bit) & 1 == 1
        out[has] = np.where(out[has] == "", name, out[has] + "," + name)
    return out.astype(str)


def write_label_catalogue(truth: pa.Table, labels: list[str], path: Path) -> int:
    """allStar-like FITS of the labelled stars (sorted by source id); returns the row count."""
    from astropy.io import fits

    t = truth.filter(truth["in_training"]).sort_by("source_id")
    col = {name: t[name].to_numpy() for name in t.column_names if not name.startswith("ood")}
    n = t.num_rows
    bp_rp = col["phot_bp_mean_mag"] - col["phot_rp_mean_mag"]
    k_mag = col["phot_g_mean_mag"] - 0.2 - 1.6 * bp_rp
    cols = [
        fits.Column("APOGEE_ID", "30A", array=apogee_ids(col["ra"], col["dec"])),
        fits.Column("TELESCOPE", "6A", array=np.full(n, "apo25m")),
        fits.Column("FIELD", "20A", array=np.full(n, "SYNTH")),
        fits.Column("RA", "D", array=col["ra"]), fits.Column("DEC", "D", array=col["dec"]),
        fits.Column("GLON", "D", array=col["l"]), fits.Column("GLAT", "D", array=col["b"]),
        fits.Column("J", "E", array=k_mag + 0.35 * bp_rp), fits.Column("H", "E", array=k_mag + 0.1 * bp_rp),
        fits.Column("K", "E", array=k_mag),
        fits.Column("SNR", "E", array=col["label_snr"]),
        fits.Column("STARFLAG", "K", array=col["label_starflag"]),
        fits.Column("STARFLAGS", "132A", array=_flag_names(col["label_starflag"], STARFLAG_NAMES)),
        fits.Column("ASPCAPFLAG", "K", array=col["label_aspcapflag"]),
        fits.Column("ASPCAPFLAGS", "256A", array=_flag_names(col["label_aspcapflag"], {ASPCAP_STAR_BAD: "STAR_BAD"})),
    ]
    for lab in labels:
        name = ALLSTAR_COLUMN[lab]
        cols.append(fits.Column(name, "E", array=col[f"label_{lab}"]))
        cols.append(fits.Column(f"{name}_ERR", "E", array=col[f"label_{lab}_err"]))
    cols += [
        fits.Column("VSINI", "E", array=col["vbroad"]),
        fits.Column("GAIAEDR3_SOURCE_ID", "K", array=col["source_id"]),
        fits.Column("GAIAEDR3_PARALLAX", "E", array=col["parallax"]),
        fits.Column("GAIAEDR3_PARALLAX_ERROR", "E", array=col["parallax_error"]),
        fits.Column("GAIAEDR3_PHOT_G_MEAN_MAG", "E", array=col["phot_g_mean_mag"]),
        fits.Column("GAIAEDR3_PHOT_BP_MEAN_MAG", "E", array=col["phot_bp_mean_mag"]),
        fits.Column("GAIAEDR3_PHOT_RP_MEAN_MAG", "E", array=col["phot_rp_mean_mag"]),
        fits.Column("EXTRATARG", "J", array=np.zeros(n, dtype=np.int32)),
        fits.Column("MEMBERFLAG", "K", array=np.zeros(n, dtype=np.int64)),
    ]
    hdu = fits.BinTableHDU.from_columns(cols)
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = ("stellar synth", "synthetic APOGEE DR17 allStar-like labels")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fits.HDUList([primary, hdu]).writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return n
