"""The synthetic survey: plan the files, generate each one, assemble catalogues.

The sky is split into contiguous HEALPix level-8 ranges of equal expected
star counts (as the Gaia archive splits its bulk files); each range is one
``FileTask`` that is generated with its own random stream
``SeedSequence([seed, file index])``. A file's content therefore depends only
on the seed and the plan, never on how tasks are spread over Spark
executors, so any partitioning gives byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stellar import __version__
from stellar.config import RealismConfig, StellarConfig, SynthConfig
from stellar.healpix import NPIX_L8, level8_range_name, lonlat_of_pixels
from stellar.instruments import Instrument
from stellar.io.ecsv_writer import write_ecsv_gz
from stellar.io.gaia_schema import gaia_table
from stellar.numerics import fingerprint, with_one_blas_thread
from stellar.runtime import LOCAL, Executor
from stellar.stage import StageResult
from stellar.synth import labels_catalogue
from stellar.synth.population import (
    OOD_NAMES, OOD_NONE, OOD_SB2, ZP_BP, ZP_G, ZP_RP, draw_population,
)
from stellar.synth.spectra import SpectrumModel
from stellar.synth.xp import BASIS_FUNCTION_ID, N_BASES, XpModel, correlation_matrix, upper_triangle

GAIA_SOURCE_SOLUTION_ID = 1636148068921376768
RVS_SOLUTION_ID = 5950420259779346465
XP_SOLUTION_ID = 4545469030156206080
SPECTRUM_BATCH = 512

RVS_DIR = "Spectroscopy/rvs_mean_spectrum"
XP_DIR = "Spectroscopy/xp_continuous_mean_spectrum"
SOURCE_DIR = "gaia_source"
TRUTH_DIR = "truth"
LABELS_DIR = "labels"
MANIFEST = "survey.json"


@dataclass(frozen=True)
class FileTask:
    """One synthetic bulk file: its index, inclusive HEALPix level-8 range, star count and the survey seed."""

    index: int
    hp8_lo: int
    hp8_hi: int  # inclusive
    n_stars: int
    seed: int

    @property
    def range_name(self) -> str:
        """The file's level-8 range suffix (``000000-003111``), as in Gaia bulk file names."""
        return level8_range_name(self.hp8_lo, self.hp8_hi)


# ICRS -> Galactic rotation A_G' of the Hipparcos catalogue (ESA 1997, vol. 1, sec. 1.5.3, eq. 1.5.11), the
# matrix the Gaia archive computes gaia_source l and b with (DR3 documentation, sec. 4.1.7). It differs from
# astropy's FK4-based Galactic frame by < 0.03 arcsec.
_ICRS_TO_GALACTIC = (
    (-0.0548755604162154, -0.8734370902348850, -0.4838350155487132),
    (+0.4941094278755837, -0.4448296299600112, +0.7469822444972189),
    (-0.8676661490190047, -0.1980763734312015, +0.4559837761750669),
)


def galactic(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Galactic l, b (deg) of ICRS ra, dec (deg), as the Gaia archive computes them.

    Written out elementwise rather than through astropy's ``SkyCoord``: astropy rotates
    with a BLAS matrix product, whose last bit depends on the BLAS kernel and thread
    count, and the generator promises the same bytes on any machine (stellar.numerics).
    """
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    x, y, z = np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)
    gx, gy, gz = ((m[0] * x + m[1] * y) + m[2] * z for m in _ICRS_TO_GALACTIC)
    lon = np.degrees(np.arctan2(gy, gx)) % 360.0
    lat = np.degrees(np.arctan2(gz, np.hypot(gx, gy)))
    return lon, lat


def sky_density(b_deg: np.ndarray) -> np.ndarray:
    """Relative star density of the spectroscopic sample versus Galactic latitude."""
    return 1.0 + 9.0 * np.exp(-np.abs(b_deg) / 12.0)


def plan_survey(cfg: SynthConfig) -> list[FileTask]:
    """Split the sky into ranges of equal expected counts and draw each file's star count."""
    n_files = max(1, int(np.ceil(cfg.n_stars / cfg.stars_per_file)))
    n_files = min(n_files, NPIX_L8)
    ra, dec = lonlat_of_pixels(8, np.arange(NPIX_L8))
    _, b = galactic(ra, dec)
    w = sky_density(b)
    cum = np.cumsum(w) / w.sum()
    cuts = np.searchsorted(cum, np.arange(1, n_files) / n_files, side="right")
    edges = np.unique(np.concatenate([[0], cuts, [NPIX_L8]]))
    mass = np.diff(np.concatenate([[0.0], cum[edges[1:] - 1]]))
    rng = np.random.default_rng([cfg.seed, 0x51A])
    counts = rng.multinomial(cfg.n_stars, mass / mass.sum())
    return [FileTask(i, int(edges[i]), int(edges[i + 1] - 1), int(counts[i]), cfg.seed)
            for i in range(len(edges) - 1)]


def _positions(rng: np.random.Generator, task: FileTask):
    pix8 = np.arange(task.hp8_lo, task.hp8_hi + 1)
    ra_c, dec_c = lonlat_of_pixels(8, pix8)
    w = sky_density(galactic(ra_c, dec_c)[1])
    n = task.n_stars
    chosen = rng.choice(pix8, size=n, p=w / w.sum())
    hp12 = chosen * 256 + rng.integers(0, 256, n)
    ra, dec = lonlat_of_pixels(12, hp12, rng.random(n), rng.random(n))
    low = rng.integers(0, 2**35, n, dtype=np.int64)
    source_id = (hp12.astype(np.int64) << 35) | low
    order = np.argsort(source_id, kind="stable")
    source_id = source_id[order]
    dup = np.flatnonzero(np.diff(source_id) == 0)
    if dup.size:  # 2**35 low bits: practically never, but ids must be unique
        source_id[dup + 1] += 1
    return source_id, ra[order], dec[order]


def _noise_kernel(sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian smoothing kernel: white noise convolved with it keeps its variance
    and gains a neighbour correlation of exp(-1 / (4 sigma^2))."""
    half = max(1, int(np.ceil(3 * sigma_px)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_px) ** 2)
    return k / np.sqrt((k * k).sum())


def _correlated_normal(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Standard normal noise correlated along pixels: a fixed-order sum of shifted white-noise
    arrays (elementwise, so the same bits on any BLAS or thread count)."""
    if sigma_px <= 0:
        return rng.standard_normal(shape)
    k = _noise_kernel(sigma_px)
    half = (k.size - 1) // 2
    w = rng.standard_normal((shape[0], shape[1] + 2 * half))
    out = np.zeros(shape)
    for j in range(k.size):  # ~7 taps, each one vector operation over the whole batch
        out += k[j] * w[:, j : j + shape[1]]
    return out


def _continuum_wiggle(rng: np.random.Generator, n: int, n_pixels: int, rms: float) -> np.ndarray:
    """(n, n_pixels) multiplicative continuum errors: three low-order cosine terms, ``rms`` overall."""
    x = np.linspace(0.0, np.pi, n_pixels)
    c = rng.normal(0.0, rms * np.sqrt(2.0 / 3.0), (n, 3))  # each cosine has mean square 1/2
    return 1.0 + c[:, 0:1] * np.cos(x) + c[:, 1:2] * np.cos(2 * x) + c[:, 2:3] * np.cos(3 * x)


def _observe_spectra(rng: np.random.Generator, model: SpectrumModel, pop: dict, idx: np.ndarray,
                     realism: RealismConfig | None = None):
    """Noisy spectra and errors for the stars ``idx`` (one batch), with the realism terms that are on."""
    r = realism or RealismConfig()
    params = {k: pop[k][idx] for k in ("teff", "logg", "m_h", "alpha_m", "fe_h", "a_li", "vbroad", "a_v")}
    rv = rng.normal(0.0, r.rv_residual_kms, idx.size) if r.rv_residual_kms > 0 else None
    flux = model.spectra(params, rv)
    sb2 = np.flatnonzero(pop["ood_kind"][idx] == OOD_SB2)
    if sb2.size:
        prim = {k: v[sb2] for k, v in params.items()}
        sec = dict(prim, teff=pop["teff2"][idx][sb2], logg=pop["logg2"][idx][sb2])
        flux[sb2] = model.binary_spectra(prim, sec, pop["light_ratio"][idx][sb2], pop["sb2_dv"][idx][sb2])
    if r.continuum_wiggle > 0:
        flux = flux * _continuum_wiggle(rng, idx.size, flux.shape[1], r.continuum_wiggle)
    snr = pop["snr"][idx][:, None]
    err = np.sqrt(np.clip(flux, 0.05, None)) / snr * rng.uniform(0.9, 1.1, flux.shape)
    obs = flux + err * _correlated_normal(rng, flux.shape, r.noise_correlation_px)
    return obs.astype(np.float32), err.astype(np.float32)


def _inject_defects(rng: np.random.Generator, cfg: SynthConfig, flux: np.ndarray, err: np.ndarray):
    """NaN pixel runs (up to ~100 px) and edge spikes, as seen in real RVS spectra."""
    n, npx = flux.shape
    n_nan = np.zeros(n, dtype=np.int16)
    has_nan = rng.random(n) < cfg.nan_pixel_fraction
    for i in np.flatnonzero(has_nan):  # rare rows; a few slices each
        for _ in range(rng.integers(1, 4)):
            length = int(rng.integers(1, 35))
            start = int(rng.choice([0, npx - length, rng.integers(0, npx - length)]))
            flux[i, start : start + length] = np.nan
            err[i, start : start + length] = np.nan
        n_nan[i] = np.isnan(flux[i]).sum()
    spike = rng.random(n) < cfg.edge_spike_fraction
    for i in np.flatnonzero(spike):
        width = int(rng.integers(3, 15))
        side = slice(0, width) if rng.random() < 0.5 else slice(npx - width, npx)
        flux[i, side] *= rng.uniform(1.5, 4.0)
    return n_nan, spike


def _gaia_source_columns(task: FileTask, source_id, ra, dec, l_deg, b_deg, pop, rng, n_transits) -> dict:
    n = source_id.size
    f32 = lambda a: pa.array(np.asarray(a, dtype=np.float32))  # noqa: E731
    f64 = lambda a: pa.array(np.asarray(a, dtype=np.float64))  # noqa: E731
    g, bp, rp = pop["phot_g_mean_mag"], pop["phot_bp_mean_mag"], pop["phot_rp_mean_mag"]
    fluxes = {k: 10 ** (-0.4 * (m - zp)) for k, m, zp in (("g", g, ZP_G), ("bp", bp, ZP_BP), ("rp", rp, ZP_RP))}
    cols: dict[str, pa.Array] = {
        "solution_id": pa.array(np.full(n, GAIA_SOURCE_SOLUTION_ID, dtype=np.int64)),
        "designation": pa.array(np.char.add("Gaia DR3 ", source_id.astype(str))),
        "source_id": pa.array(source_id),
        "random_index": pa.array(rng.integers(0, 1_811_709_771, n, dtype=np.int64)),
        "ref_epoch": f64(np.full(n, 2016.0)),
        "ra": f64(ra), "dec": f64(dec),
        "ra_error": f32(0.6 * pop["parallax_error"]), "dec_error": f32(0.55 * pop["parallax_error"]),
        "parallax": f64(pop["parallax"]), "parallax_error": f32(pop["parallax_error"]),
        "parallax_over_error": f32(pop["parallax"] / pop["parallax_error"]),
        "ruwe": f32(np.where(pop["ood_kind"] == OOD_SB2, rng.uniform(1.2, 3.0, n), rng.lognormal(0.0, 0.06, n))),
        "astrometric_params_solved": pa.array(np.full(n, 31, dtype=np.int16)),
        "duplicated_source": pa.array(np.zeros(n, dtype=bool)),
        "visibility_periods_used": pa.array(np.clip(n_transits // 2, 9, 30).astype(np.int16)),
        "phot_g_mean_mag": f32(g), "phot_bp_mean_mag": f32(bp), "phot_rp_mean_mag": f32(rp),
        "bp_rp": f32(bp - rp), "bp_g": f32(bp - g), "g_rp": f32(g - rp),
        "grvs_mag": f32(pop["grvs_mag"]), "rvs_spec_sig_to_noise": f32(pop["snr"]),
        "phot_variable_flag": pa.array(np.full(n, "NOT_AVAILABLE")),
        "l": f64(l_deg), "b": f64(b_deg),
        "has_xp_continuous": pa.array(np.ones(n, dtype=bool)), "has_rvs": pa.array(np.ones(n, dtype=bool)),
        "radial_velocity": f32(rng.normal(0.0, 40.0, n)), "radial_velocity_error": f32(rng.uniform(0.3, 3.0, n)),
        "vbroad": f32(pop["vbroad"]),
    }
    for band, key in (("g", "phot_g"), ("bp", "phot_bp"), ("rp", "phot_rp")):
        flux = fluxes[band]
        ferr = np.sqrt(flux) * 0.02 + flux * 0.0005
        cols[f"{key}_mean_flux"] = f64(flux)
        cols[f"{key}_mean_flux_error"] = f32(ferr)
        cols[f"{key}_mean_flux_over_error"] = f32(flux / ferr)
        cols[f"{key}_n_obs"] = pa.array((n_transits * (9 if band == "g" else 1)).astype(np.int16))
    for flag in ("in_qso_candidates", "in_galaxy_candidates", "has_xp_sampled", "has_epoch_photometry",
                 "has_epoch_rv", "has_mcmc_gspphot", "has_mcmc_msc", "in_andromeda_survey"):
        cols[flag] = pa.array(np.zeros(n, dtype=bool))
    return cols


def _xp_columns(source_id, xp_obs: dict, has_bp: np.ndarray, rng, n_transits) -> dict:
    n = source_id.size
    cols: dict[str, pa.Array] = {
        "source_id": pa.array(source_id),
        "solution_id": pa.array(np.full(n, XP_SOLUTION_ID, dtype=np.int64)),
    }
    for band in ("bp", "rp"):
        present = has_bp if band == "bp" else np.ones(n, dtype=bool)
        mask = ~present
        n_meas = (n_transits * rng.uniform(60, 120, n)).astype(np.int16)
        n_rej = rng.integers(0, 30, n).astype(np.int16)
        sd = (1.0 + np.abs(rng.normal(0.05, 0.05, n))).astype(np.float32)
        dof = (n_meas - N_BASES - n_rej).astype(np.int16)
        corr = upper_triangle(correlation_matrix(band)).astype(np.float32)
        coeff = xp_obs[band]["coefficients"]
        errs = xp_obs[band]["errors"]
        offsets = np.arange(n + 1, dtype=np.int32) * N_BASES
        coff = np.arange(n + 1, dtype=np.int32) * corr.size
        maskp = pa.array(mask)
        scal = lambda a: pa.array(a, mask=mask)  # noqa: E731
        cols.update({
            f"{band}_basis_function_id": scal(np.full(n, BASIS_FUNCTION_ID[band], dtype=np.int16)),
            f"{band}_degrees_of_freedom": scal(dof),
            f"{band}_n_parameters": scal(np.full(n, N_BASES, dtype=np.int16)),
            f"{band}_n_measurements": scal(n_meas),
            f"{band}_n_rejected_measurements": scal(n_rej),
            f"{band}_standard_deviation": scal(sd),
            f"{band}_chi_squared": scal((dof * sd.astype(np.float64) ** 2).astype(np.float32)),
            f"{band}_coefficients": pa.ListArray.from_arrays(pa.array(offsets), pa.array(coeff.ravel()), mask=maskp),
            f"{band}_coefficient_errors": pa.ListArray.from_arrays(pa.array(offsets), pa.array(errs.ravel()), mask=maskp),
            f"{band}_coefficient_correlations": pa.ListArray.from_arrays(pa.array(coff), pa.array(np.tile(corr, n)), mask=maskp),
            f"{band}_n_relevant_bases": scal(np.clip(35 + (np.log10(np.abs(coeff[:, 0]) + 1) * 4).astype(np.int16), 10, 55).astype(np.int16)),
            f"{band}_relative_shrinking": scal(np.ones(n, dtype=np.float32)),
        })
    return cols


def _rvs_columns(source_id, ra, dec, flux, err, n_transits) -> dict:
    n, npx = flux.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * npx)
    return {
        "solution_id": pa.array(np.full(n, RVS_SOLUTION_ID, dtype=np.int64)),
        "source_id": pa.array(source_id),
        "ra": pa.array(ra), "dec": pa.array(dec),
        "flux": pa.ListArray.from_arrays(offsets, pa.array(flux.ravel())),
        "flux_error": pa.ListArray.from_arrays(offsets, pa.array(err.ravel())),
        "combined_transits": pa.array(n_transits.astype(np.int16)),
        "combined_ccds": pa.array((n_transits * 3 - (n_transits // 7)).astype(np.int16)),
        "deblended_ccds": pa.array((n_transits // 9).astype(np.int16)),
    }


def _write_fits_spectra(path: Path, instrument: Instrument, source_id, flux, err) -> int:
    """Spectra of a non-Gaia instrument: one FITS binary table per file, the grid in its own HDU."""
    from astropy.io import fits

    npx = flux.shape[1]
    primary = fits.PrimaryHDU()
    primary.header["INSTRUME"] = (instrument.name, "instrument preset")
    primary.header["ORIGIN"] = ("stellar synth", "synthetic survey")
    table = fits.BinTableHDU.from_columns([
        fits.Column(name="source_id", format="K", array=source_id),
        fits.Column(name="flux", format=f"{npx}E", array=flux),
        fits.Column(name="flux_error", format=f"{npx}E", array=err),
    ], name="SPECTRA")
    wave = fits.ImageHDU(instrument.wave, name="WAVELENGTH")
    wave.header["BUNIT"] = "nm"
    wave.header["MEDIUM"] = instrument.wavelength.medium
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([primary, table, wave]).writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path.stat().st_size


@with_one_blas_thread  # same rounding in-process and in every Spark task (stellar.numerics)
def generate_file(task: FileTask, cfg: SynthConfig, instrument: Instrument, out_dir: str) -> dict:
    """Generate every product of one sky range; pure apart from the files it writes."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    rng = np.random.default_rng([task.seed, task.index])
    source_id, ra, dec = _positions(rng, task)
    n = source_id.size
    l_deg, b_deg = galactic(ra, dec)
    pop = draw_population(rng, n, cfg.ood_fraction, cfg.grvs_limit, instrument.snr_at_limit, b_deg,
                          cfg.realism.extinction_scale, tuple(cfg.realism.sb2_dv_kms), cfg.realism.sb2_blend,
                          tuple(cfg.realism.hot_teff), tuple(cfg.realism.emp_m_h), cfg.realism.emp_dwarf_fraction)
    n_transits = np.clip(rng.poisson(22, n), 5, 60).astype(np.int32)
    if cfg.realism.fast_rotator_fraction > 0:  # rotation: fast-spinning dwarfs inside the distribution
        fast = (pop["ood_kind"] == OOD_NONE) & (pop["stage"] < 2) & (rng.random(n) < cfg.realism.fast_rotator_fraction)
        pop["vbroad"] = np.where(fast, rng.uniform(15.0, 60.0, n), pop["vbroad"])

    model = SpectrumModel(instrument)
    flux = np.empty((n, instrument.n_pixels), dtype=np.float32)
    err = np.empty_like(flux)
    for lo in range(0, n, SPECTRUM_BATCH):
        idx = np.arange(lo, min(n, lo + SPECTRUM_BATCH))
        flux[idx], err[idx] = _observe_spectra(rng, model, pop, idx, cfg.realism)
    n_nan, spike = _inject_defects(rng, cfg, flux, err)

    xp = XpModel()
    band_flux = {b: 10 ** (-0.4 * (pop[f"phot_{b}_mean_mag"] - zp)) for b, zp in (("bp", ZP_BP), ("rp", ZP_RP))}
    coeff = xp.coefficients(pop["teff"], pop["m_h"], pop["a_v"], band_flux)
    sb2 = np.flatnonzero(pop["ood_kind"] == OOD_SB2)
    if cfg.realism.sb2_blend and sb2.size:  # the secondary's light in each band's XP spectrum
        sec = xp.coefficients(pop["teff2"][sb2], pop["m_h"][sb2], pop["a_v"][sb2],
                              {b: f[sb2] for b, f in band_flux.items()})
        for band, ratio in (("bp", pop["light_ratio_bp"][sb2]), ("rp", pop["light_ratio"][sb2])):
            w = (ratio / (1.0 + ratio))[:, None]
            coeff[band][sb2] = (1.0 - w) * coeff[band][sb2] + w * sec[band]
    xp_obs = xp.observe(rng, coeff)
    has_bp = rng.random(n) >= cfg.missing_bp_fraction

    labelled = labels_catalogue.choose_training(rng, pop, cfg.training_fraction, cfg.grvs_limit,
                                                cfg.realism.label_snr_power)
    apogee = labels_catalogue.measure_labels(rng, pop, labelled, cfg.label_bad_fraction, instrument.labels)

    name = task.range_name
    files = {}
    if instrument.spectrum_format == "gaia_rvs_ecsv":
        meta = {"RELEASE": "Gaia DR3 (synthetic, stellar synth)", "INSTRUMENT": instrument.name}
        rvs_path = out / RVS_DIR / f"RvsMeanSpectrum_{name}.csv.gz"
        files["rvs"] = write_ecsv_gz(rvs_path, gaia_table("rvs_mean_spectrum"),
                                     _rvs_columns(source_id, ra, dec, flux, err, n_transits), n, meta, cfg.gzip_level)
    else:
        spec_path = out / "Spectroscopy" / instrument.name / f"Spectra_{name}.fits"
        files["spectra"] = _write_fits_spectra(spec_path, instrument, source_id, flux, err)
    meta = {"RELEASE": "Gaia DR3 (synthetic, stellar synth)"}
    files["xp"] = write_ecsv_gz(out / XP_DIR / f"XpContinuousMeanSpectrum_{name}.csv.gz",
                                gaia_table("xp_continuous_mean_spectrum"),
                                _xp_columns(source_id, xp_obs, has_bp, rng, n_transits), n, meta, cfg.gzip_level)
    files["gaia_source"] = write_ecsv_gz(out / SOURCE_DIR / f"GaiaSource_{name}.csv.gz", gaia_table("gaia_source"),
                                         _gaia_source_columns(task, source_id, ra, dec, l_deg, b_deg, pop, rng, n_transits),
                                         n, meta, cfg.gzip_level)

    truth = {"source_id": source_id, "ra": ra, "dec": dec, "l": l_deg, "b": b_deg, "file_index": np.full(n, task.index, np.int32)}
    truth.update({k: v for k, v in pop.items()})
    truth["ood_kind"] = np.array([OOD_NAMES[k] for k in range(4)])[pop["ood_kind"]]
    truth["is_ood"] = pop["ood_kind"] != OOD_NONE
    truth.update({"has_bp": has_bp, "n_nan_pixels": n_nan, "edge_spike": spike, "in_training": labelled,
                  "n_transits": n_transits})
    truth.update({f"label_{k}": v for k, v in apogee.items()})
    tpath = out / TRUTH_DIR / f"truth_{name}.parquet"
    tpath.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(truth), tpath, compression="zstd")
    return {"index": task.index, "range": name, "n_stars": n, "n_labelled": int(labelled.sum()),
            "n_ood": int(truth["is_ood"].sum()), "bytes": files, "seconds": time.perf_counter() - t0}


def md5sum_files(folder: Path) -> None:
    """Write the archive's per-folder ``_MD5SUM.txt`` (``<md5>  <file name>`` lines)."""
    lines = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.name != "_MD5SUM.txt"):
        h = hashlib.md5()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        lines.append(f"{h.hexdigest()}  {f.name}\n")
    (folder / "_MD5SUM.txt").write_text("".join(lines))


# Maps (tasks, config, instrument, output folder) to one result dict per task.


def run_survey(cfg: SynthConfig, instrument: Instrument, executor: Executor | None = None,
               out_dir: str | None = None) -> dict:
    """Generate the whole survey into ``out_dir`` atomically; returns the manifest.

    ``executor`` runs the file tasks (one file per task: Spark in ``jobs/synth.py``; in-process by
    default). The config and preset travel to the tasks as plain dicts, re-validated there, and
    the tasks write their files straight into the (shared) staging folder; only small result dicts
    come back. Output goes to a staging folder that replaces ``out_dir`` only
    when everything is written, so an interrupted run leaves the previous
    survey (or nothing) in place.
    """
    t0 = time.perf_counter()
    final = Path(out_dir or cfg.output_dir).resolve()
    staging = final.with_name(f".{final.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    tasks = plan_survey(cfg)
    cfg_d, inst_d, out = cfg.model_dump(), instrument.model_dump(), str(staging)

    def work(task: FileTask) -> dict:
        return generate_file(task, SynthConfig(**cfg_d), Instrument(**inst_d), out)

    results = list((executor or LOCAL).map(work, tasks))
    results.sort(key=lambda r: r["index"])
    truth = pq.read_table(staging / TRUTH_DIR)
    n_lab = labels_catalogue.write_label_catalogue(truth, instrument.labels, staging / LABELS_DIR / "allStar-synth.fits")
    for sub in (RVS_DIR, XP_DIR, SOURCE_DIR, f"Spectroscopy/{instrument.name}"):
        if (staging / sub).is_dir():
            md5sum_files(staging / sub)
    manifest = {
        "stellar_version": __version__,
        "instrument": instrument.name,
        "config": cfg.model_dump(exclude={"output_dir"}),
        "n_files": len(tasks),
        "n_stars": int(sum(r["n_stars"] for r in results)),
        "n_labelled": n_lab,
        "n_ood": int(sum(r["n_ood"] for r in results)),
        "files": [{k: r[k] for k in ("index", "range", "n_stars", "n_labelled", "n_ood", "bytes")} for r in results],
        "tasks": [asdict(t) for t in tasks],
        # the bytes are the same on any machine with the same numpy SIMD level (README, reproducibility)
        "numerics": fingerprint(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)
    manifest["seconds"] = time.perf_counter() - t0
    manifest["task_seconds"] = float(sum(r["seconds"] for r in results))
    manifest["path"] = str(final)
    return manifest



def committed_survey(cfg: SynthConfig, instrument: Instrument) -> dict | None:
    """The manifest of the survey already in ``cfg.output_dir`` when it was generated with exactly these
    settings, instrument and code version (``survey.json``), else None."""
    path = Path(cfg.output_dir) / "survey.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    same = m.get("config") == json.loads(json.dumps(cfg.model_dump(exclude={"output_dir"}))) and \
        m.get("instrument") == instrument.name and m.get("stellar_version") == __version__
    return {**m, "path": str(path.parent)} if same else None


def run(cfg: StellarConfig, instrument: Instrument, executor: Executor | None = None) -> StageResult:
    """The stage contract (:mod:`stellar.stage`): the survey, unless the one on disk has these settings."""
    done = committed_survey(cfg.synth, instrument)
    if done is not None:
        return StageResult("synth", "up_to_date", None, done.get("digest"), done)
    manifest = run_survey(cfg.synth, instrument, executor=executor)
    return StageResult("synth", "ran", None, manifest.get("digest"), manifest)
