"""The synthetic survey: formats as the real archive files, values as designed, reproducible."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from stellar.healpix import healpix_index, pixels_of_lonlat
from stellar.synth.labels_catalogue import ASPCAP_STAR_BAD
from stellar.synth.survey import RVS_DIR, SOURCE_DIR, XP_DIR, run_survey

from conftest import ROOT, small_config

GAIA_NULL = [("null", "0"), ("", "0")]  # bulk files write missing values as "null" (astropy issue 13331), query results as ""


def read_ecsv(path: Path) -> Table:
    return Table.read(path, format="ascii.ecsv", fill_values=GAIA_NULL)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "survey.json"}


@pytest.fixture(scope="module")
def truth(small_survey):
    return pq.read_table(small_survey[0] / "truth").to_pandas()


def test_layout_and_counts_add_up(small_survey, truth):
    path, manifest, cfg = small_survey
    n = cfg.synth.n_stars
    assert manifest["n_stars"] == n == len(truth) == truth.source_id.nunique()
    for sub, prefix in ((RVS_DIR, "RvsMeanSpectrum_"), (XP_DIR, "XpContinuousMeanSpectrum_"), (SOURCE_DIR, "GaiaSource_")):
        files = sorted((path / sub).glob(f"{prefix}*.csv.gz"))
        assert len(files) == manifest["n_files"] == 3
        rows = sum(sum(1 for ln in gzip.open(f, "rt") if not ln.startswith("#")) - 1 for f in files)
        assert rows == n
        # _MD5SUM.txt lists every file with its real checksum
        listed = dict(line.split("  ")[::-1] for line in (path / sub / "_MD5SUM.txt").read_text().splitlines())
        assert {f.name for f in files} == set(listed)
        for f in files:
            assert hashlib.md5(f.read_bytes()).hexdigest() == listed[f.name]
    assert json.loads((path / "survey.json").read_text())["n_stars"] == n


def test_files_sit_in_their_healpix_range(small_survey, truth):
    path, manifest, _ = small_survey
    for task in manifest["tasks"]:
        lo, hi = task["hp8_lo"], task["hp8_hi"]
        t = read_ecsv(path / SOURCE_DIR / f"GaiaSource_{lo:06d}-{hi:06d}.csv.gz")
        sid = np.asarray(t["source_id"], dtype=np.int64)
        assert np.all(np.diff(sid) > 0)  # sorted, unique
        hp8 = healpix_index(sid, 8)
        assert hp8.min() >= lo and hp8.max() <= hi
        hp12 = healpix_index(sid, 12)
        assert hp12.max() < 12 * 4**12
        assert np.array_equal(hp12, pixels_of_lonlat(12, t["ra"], t["dec"]))


def test_same_seed_gives_byte_identical_files(tmp_path, rvs_instrument):
    a = run_survey(small_config(tmp_path / "a", n_stars=300, stars_per_file=150).synth, rvs_instrument)
    b = run_survey(small_config(tmp_path / "b", n_stars=300, stars_per_file=150).synth, rvs_instrument)
    c = run_survey(small_config(tmp_path / "c", n_stars=300, stars_per_file=150,
                                **{"synth.seed": 43}).synth, rvs_instrument)
    da, db, dc = (tree_digest(Path(m["path"])) for m in (a, b, c))
    assert da == db and len(da) >= 9
    assert da != dc
    # gzip header: no timestamp, no file name
    gz = next((Path(a["path"]) / RVS_DIR).glob("*.csv.gz")).read_bytes()
    assert gz[:2] == b"\x1f\x8b" and gz[4:8] == b"\x00\x00\x00\x00" and not gz[3] & 0x08


_DIGEST_SCRIPT = """
import hashlib, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from conftest import small_config
from stellar.instruments import load_instrument
from stellar.synth.survey import run_survey
m = run_survey(small_config(Path(sys.argv[1]), n_stars=300, stars_per_file=150,
                            **{"synth.ood_fraction": 0.05}).synth, load_instrument("gaia_rvs"))
h = hashlib.sha256()
for p in sorted(Path(m["path"]).rglob("*")):
    if p.is_file() and p.name != "survey.json":
        h.update(p.name.encode() + b"\\0" + p.read_bytes())
print(h.hexdigest())
"""


@pytest.mark.slow
def test_generator_bytes_do_not_depend_on_blas_threads_or_kernel(tmp_path):
    """The same bytes with 1 or 2 BLAS threads and with another OpenBLAS kernel (Sandybridge: AVX
    without FMA, so any BLAS or LAPACK call in the generator would round differently)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}
    settings = {"default": {}, "1 thread": {"OPENBLAS_NUM_THREADS": "1"}, "2 threads": {"OPENBLAS_NUM_THREADS": "2"},
                "Sandybridge kernel": {"OPENBLAS_CORETYPE": "Sandybridge", "OPENBLAS_NUM_THREADS": "2"}}
    digests = {}
    for name, extra in settings.items():
        out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT, str(tmp_path / name), str(ROOT / "tests")],
                             env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        digests[name] = out.stdout.split()[-1]
    assert len(set(digests.values())) == 1, digests


def test_rvs_file_matches_the_real_format(small_survey, truth, real_data, rvs_instrument):
    path = small_survey[0]
    t = read_ecsv(sorted((path / RVS_DIR).glob("*.csv.gz"))[0])
    assert t.colnames == ["solution_id", "source_id", "ra", "dec", "flux", "flux_error",
                          "combined_transits", "combined_ccds", "deblended_ccds"]
    flux = np.stack([np.asarray(f, dtype=np.float32) for f in t["flux"]])
    assert flux.shape[1] == 2401 and t["flux"][0].dtype == np.float32
    # the real DataLink products of the same table: 2401 pixels on the same grid, float32 flux
    real = Table.read(real_data / "gaiaspec_rvs" / "Kepler-93.csv", format="ascii.csv")
    assert len(real) == 2401
    assert np.allclose(np.asarray(real["wavelength"]), rvs_instrument.wave, atol=1e-6)
    with fits.open(real_data / "msc_adriana_rvs_fits" / "RVS-Gaia DR3 2887834618539920256.fits") as hdul:
        assert hdul[1].columns["flux"].format == "E" and hdul[1].data.size == 2401
    # NaN pixels survive the text round trip, exactly where the truth says
    tr = truth.set_index("source_id").loc[np.asarray(t["source_id"])]
    assert np.array_equal(np.isnan(flux).sum(axis=1), tr.n_nan_pixels.to_numpy())
    assert tr.n_nan_pixels.max() <= 110 and (tr.n_nan_pixels > 0).any()
    # continuum-normalised, noise consistent with the S/N in gaia_source
    good = ~np.isnan(flux)
    assert 0.95 < np.median(flux[good]) < 1.02
    err = np.stack([np.asarray(f) for f in t["flux_error"]])
    snr_est = np.nanmedian(np.where(good, flux / err, np.nan), axis=1)
    assert np.corrcoef(snr_est, tr.snr)[0, 1] > 0.95


def test_xp_file_matches_the_real_format(small_survey, truth, real_data):
    path = small_survey[0]
    ours = read_ecsv(sorted((path / XP_DIR).glob("*.csv.gz"))[0])
    real = read_ecsv(real_data / "gaiaxpy_xp" / "XP_CONTINUOUS_RAW_with_missing_BP.ecsv")
    assert ours.colnames == real.colnames
    assert [ours[c].dtype for c in ours.colnames] == [real[c].dtype for c in real.colnames]
    present = [np.asarray(v) for v in ours["rp_coefficient_correlations"]]
    assert {v.size for v in present} == {1485}
    assert {np.asarray(v).size for v in ours["rp_coefficients"]} == {55}
    # missing BP looks like the real missing-BP source: empty array, masked scalars
    tr = truth.set_index("source_id").loc[np.asarray(ours["source_id"])]
    no_bp = ~tr.has_bp.to_numpy()
    assert no_bp.any()
    sizes = np.array([np.asarray(v).size for v in ours["bp_coefficients"]])
    assert np.array_equal(sizes == 0, no_bp)
    real_missing = np.asarray(real["source_id"]) == 5405570973190252288
    assert np.asarray(real["bp_coefficients"][real_missing][0]).size == 0
    assert np.all(ours["bp_n_relevant_bases"].mask == no_bp)


def test_gaia_source_matches_the_real_format(small_survey, truth, real_data):
    ours = read_ecsv(sorted((small_survey[0] / SOURCE_DIR).glob("*.csv.gz"))[0])
    real = Table.read(real_data / "astroquery_gaia" / "1712337806100O-result.ecsv", format="ascii.ecsv")
    real_cols = [c for c in real.colnames if c != "dist"]  # 'dist' is the cone query's own column
    assert ours.colnames == real_cols
    for c in real_cols:
        assert ours[c].dtype.kind == real[c].dtype.kind, c
    tr = truth.set_index("source_id").loc[np.asarray(ours["source_id"])]
    assert np.allclose(ours["phot_g_mean_mag"], tr.phot_g_mean_mag, atol=1e-4)
    assert np.allclose(ours["parallax"], tr.parallax)
    assert np.allclose(ours["rvs_spec_sig_to_noise"], tr.snr, rtol=1e-5)


def test_population_is_milky_way_like(truth):
    t = truth[~truth.is_ood]
    assert t.m_h.min() >= -2.5 and t.m_h.max() <= 0.5
    frac_low = ((truth.snr >= 15) & (truth.snr < 25)).mean()
    assert 0.25 < frac_low < 0.45  # about a third of the stars at S/N 15-25
    # the thin/thick-disc [alpha/M] bimodality at intermediate metallicity
    mid = t[(t.m_h > -0.8) & (t.m_h < -0.2)]
    hist, edges = np.histogram(mid.alpha_m, bins=np.arange(-0.1, 0.46, 0.05))
    peaks = [i for i in range(1, len(hist) - 1) if hist[i] >= hist[i - 1] and hist[i] >= hist[i + 1] and hist[i] > 5]
    assert len(peaks) >= 2 and edges[peaks[-1]] - edges[peaks[0]] >= 0.15, hist
    giants = t.logg < 3.5
    assert 0.3 < giants.mean() < 0.8
    assert np.corrcoef(t.teff[giants], t.logg[giants])[0, 1] > 0.5  # RGB locus
    assert (truth.parallax_error > 0).all() and np.isfinite(truth.phot_bp_mean_mag).all()


def test_ood_stars_injected_and_never_labelled(small_survey, truth):
    ood = truth[truth.is_ood]
    assert 0.02 < len(ood) / len(truth) < 0.09  # configured 5 %
    assert set(ood.ood_kind) == {"hot_star", "extremely_metal_poor", "sb2_binary"}
    assert not ood.in_training.any()
    assert (ood[ood.ood_kind == "hot_star"].teff > 7400).all()
    assert (ood[ood.ood_kind == "extremely_metal_poor"].m_h < -2.9).all()


def test_allstar_labels_match_truth_within_noise(small_survey, truth, real_data):
    path = small_survey[0]
    with fits.open(path / "labels" / "allStar-synth.fits") as hdul:
        data = hdul[1].data
        ours_fmt = {c.name: c.format for c in hdul[1].columns}
    with fits.open(real_data / "apogee_dr17_montalban_kepler" / "Montalban2021_X_APOGEE_DR17.fits") as hdul:
        real_fmt = {c.name: c.format for c in hdul[1].columns}
    shared = [c for c in ours_fmt if c in real_fmt]
    assert len(shared) >= 30
    assert {c: ours_fmt[c] for c in shared} == {c: real_fmt[c] for c in shared}
    assert len(data) == truth.in_training.sum()
    tr = truth.set_index("source_id").loc[data["GAIAEDR3_SOURCE_ID"]]
    good = (data["ASPCAPFLAG"] & (1 << ASPCAP_STAR_BAD)) == 0
    assert 0.9 < good.mean() < 1.0
    for col, lab in (("TEFF", "teff"), ("LOGG", "logg"), ("M_H", "m_h"), ("ALPHA_M", "alpha_m"), ("FE_H", "fe_h")):
        z = (data[col] - tr[lab].to_numpy()) / data[f"{col}_ERR"]
        assert np.abs(z[good]).max() < 5.5, col
        assert 0.85 < np.std(z[good]) < 1.15, col
        assert np.std(z[~good]) > 3, col  # flagged rows really are bad
    ids = data["APOGEE_ID"]
    assert all(i.startswith("2M") and len(i) == 18 for i in ids[:20])


def test_second_instrument_writes_fits_spectra_and_lithium(tmp_path, hr15n_instrument):
    cfg = small_config(tmp_path, n_stars=200, stars_per_file=100, instrument="ges_hr15n")
    m = run_survey(cfg.synth, hr15n_instrument)
    path = Path(m["path"])
    files = sorted((path / "Spectroscopy" / "ges_hr15n").glob("Spectra_*.fits"))
    assert len(files) == m["n_files"] == 2
    with fits.open(files[0]) as hdul:
        assert hdul["SPECTRA"].columns["flux"].format == "3201E"
        assert np.allclose(hdul["WAVELENGTH"].data, hr15n_instrument.wave)
    assert not (path / RVS_DIR).exists()
    with fits.open(path / "labels" / "allStar-synth.fits") as hdul:
        cols = hdul[1].columns.names
        assert "A_LI" in cols and "A_LI_ERR" in cols


def test_one_thread_policy_reaches_runtimes_loaded_inside_it():
    """threadpoolctl limits only the runtimes loaded when the limit is set: in a fresh process whose
    first scipy/scikit-learn import happens inside the policy (as in a resumed pipeline's select),
    every BLAS and OpenMP runtime must still run one thread."""
    code = ("import sys, threadpoolctl\n"
            "assert 'scipy.linalg' not in sys.modules\n"
            "from stellar.numerics import one_blas_thread\n"
            "with one_blas_thread():\n"
            "    import sklearn.decomposition, scipy.linalg\n"
            "    info = threadpoolctl.threadpool_info()\n"
            "print(len(info), sorted({i['num_threads'] for i in info}), sorted({i['prefix'] for i in info}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_NUM_THREADS": "2"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n, threads, prefixes = out.stdout.strip().split(" ", 2)
    assert int(n) >= 2 and threads == "[1]" and "libscipy_openblas" in prefixes, out.stdout


def test_realism_terms_do_what_the_hard_preset_says():
    """The hard preset's noise is correlated as documented and keeps unit variance, the continuum
    error has the stated rms, and the presets load by name."""
    from stellar.config import load_config
    from stellar.synth.survey import _continuum_wiggle, _correlated_normal

    rng = np.random.default_rng(0)
    x = _correlated_normal(rng, (400, 2401), 1.0)
    lag1 = np.mean(x[:, 1:] * x[:, :-1]) / np.mean(x * x)
    assert abs(x.std() - 1.0) < 0.01 and abs(lag1 - np.exp(-0.25)) < 0.01
    assert np.array_equal(_correlated_normal(np.random.default_rng(1), (3, 50), 0.0),
                          np.random.default_rng(1).standard_normal((3, 50)))  # off: the white-noise draws
    w = _continuum_wiggle(rng, 2000, 2401, 0.005)
    assert abs(np.sqrt(np.mean((w - 1) ** 2)) - 0.005) < 0.0005
    hard = load_config(None, ["synth.realism=hard"]).synth.realism
    assert hard.extinction_scale == 1.5 and hard.noise_correlation_px == 1.0 and hard.fast_rotator_fraction == 0.05
    assert load_config(None, []).synth.realism == load_config(None, ["synth.realism=default"]).synth.realism


def test_label_survey_favours_bright_stars_as_the_hard_preset_says():
    """realism.label_snr_power: the labelled stars' median S/N is well above the catalogue's while the
    labelled share stays ``training_fraction``; at 0 the selection is the old one, draw for draw."""
    from stellar.config import load_config
    from stellar.synth.labels_catalogue import brightness_weight, choose_training
    from stellar.synth.population import draw_population

    pop = draw_population(np.random.default_rng(3), 40000, 0.0, 14.1, 18.0, np.zeros(40000), 1.0)
    power = load_config(None, ["synth.realism=hard"]).synth.realism.label_snr_power
    assert power > 0 and load_config(None, []).synth.realism.label_snr_power == 0
    giant_share = np.mean(pop["stage"] >= 2)
    expected = 0.3 * (1.4 * giant_share + 0.6 * (1 - giant_share))
    plain = choose_training(np.random.default_rng(5), pop, 0.3, 14.1)
    bright = choose_training(np.random.default_rng(5), pop, 0.3, 14.1, power)
    assert abs(plain.mean() - expected) < 0.01 and abs(bright.mean() - expected) < 0.02
    assert np.array_equal(plain, choose_training(np.random.default_rng(5), pop, 0.3, 14.1, 0.0))
    ratio = np.median(pop["snr"][bright]) / np.median(pop["snr"])
    assert 1.7 < ratio < 2.6, ratio
    assert np.median(pop["snr"][plain]) / np.median(pop["snr"]) < 1.15
    # the weight's normalisation is computed, not taken from the stars at hand: mean 1 over the sample
    assert abs(brightness_weight(pop["grvs_mag"], 14.1, power).mean() - 1.0) < 0.03


def test_hard_binaries_follow_main_sequence_light_and_blend_into_the_colours():
    """realism.sb2_dv_kms / sb2_blend: the hard preset's binaries reach below the RVS resolution element,
    their light ratio follows the Teff ratio (fainter and redder secondaries than the demo's), the
    secondary reddens the system's colour, and every other draw of the population is the demo's."""
    from stellar.config import load_config
    from stellar.errors import ConfigError
    from stellar.synth.population import OOD_SB2, draw_population

    hard = load_config(None, ["synth.realism=hard"]).synth.realism
    assert tuple(hard.sb2_dv_kms) == (15.0, 150.0) and hard.sb2_blend
    demo = load_config(None, []).synth.realism
    assert tuple(demo.sb2_dv_kms) == (40.0, 120.0) and not demo.sb2_blend
    with pytest.raises(ConfigError, match="sb2_dv_kms must be 0 <= low <= high <= 500"):
        load_config(None, ["synth.realism={sb2_dv_kms: [50, 20]}"])

    args = (40000, 0.3, 14.1, 18.0, np.zeros(40000), 1.0)
    plain = draw_population(np.random.default_rng(7), *args)
    blend = draw_population(np.random.default_rng(7), *args, sb2_dv_kms=(15.0, 150.0), sb2_blend=True)
    sb2 = plain["ood_kind"] == OOD_SB2
    assert np.array_equal(sb2, blend["ood_kind"] == OOD_SB2) and sb2.sum() > 3000
    for k in ("teff", "logg", "m_h", "alpha_m", "snr"):  # the same stream either way
        assert np.array_equal(plain[k], blend[k]), k
    for k in ("phot_g_mean_mag", "parallax_error", "a_v"):  # the binaries' colours, and all they set, alone differ
        assert np.array_equal(plain[k][~sb2], blend[k][~sb2]), k
    dv = np.abs(blend["sb2_dv"][sb2])
    assert 15.0 <= dv.min() < 17.0 and 148.0 < dv.max() <= 150.0
    assert 40.0 <= np.abs(plain["sb2_dv"][sb2]).min()
    ratio = blend["teff2"][sb2] / blend["teff"][sb2]
    lr = blend["light_ratio"][sb2]
    assert lr.max() <= 1.0 and np.quantile(lr, 0.1) < 0.2 < np.quantile(plain["light_ratio"][sb2], 0.01) + 0.3
    assert np.corrcoef(np.log(ratio), np.log(lr))[0, 1] > 0.95  # light follows the Teff ratio
    assert np.all(blend["light_ratio_bp"][sb2] <= lr + 1e-12)  # cooler secondaries give less light in BP
    # the secondary's light reddens the system: intrinsic colour redder than the primary's alone
    dcol = blend["bp_rp0"][sb2] - plain["bp_rp0"][sb2]
    assert np.all(dcol >= -1e-9) and np.median(dcol) > 0.005
    assert np.array_equal(blend["bp_rp0"][~sb2], plain["bp_rp0"][~sb2])


def test_hard_odd_stars_reach_closer_to_the_training_edges():
    """realism.hot_teff / emp_m_h / emp_dwarf_fraction: the hard preset's hot stars stop at 9,500 K, its
    very metal-poor stars start 0.1 dex below the population's -2.5 edge and a share are turn-off dwarfs;
    the in-distribution stars are drawn exactly as without them."""
    from stellar.config import load_config
    from stellar.synth.population import OOD_EMP, OOD_HOT, OOD_NONE, draw_population

    hard = load_config(None, ["synth.realism=hard"]).synth.realism
    args = (40000, 0.3, 14.1, 18.0, np.zeros(40000), 1.0)
    plain = draw_population(np.random.default_rng(11), *args)
    odd = draw_population(np.random.default_rng(11), *args, hot_teff=tuple(hard.hot_teff),
                          emp_m_h=tuple(hard.emp_m_h), emp_dwarf_fraction=hard.emp_dwarf_fraction)
    ind = plain["ood_kind"] == OOD_NONE
    for k in ("teff", "logg", "m_h", "alpha_m", "phot_g_mean_mag", "parallax"):
        assert np.array_equal(plain[k][ind], odd[k][ind]), k
    assert plain["m_h"][ind].min() >= -2.5
    hot, emp = odd["ood_kind"] == OOD_HOT, odd["ood_kind"] == OOD_EMP
    assert 7500 <= odd["teff"][hot].min() and odd["teff"][hot].max() <= 9500 < plain["teff"][hot].max()
    assert -4.0 <= odd["m_h"][emp].min() and -2.61 < odd["m_h"][emp].max() <= -2.6
    assert plain["m_h"][emp].max() <= -3.0
    dwarf = emp & (odd["stage"] == 0)
    assert abs(dwarf.sum() / emp.sum() - hard.emp_dwarf_fraction) < 0.03 and not np.any(emp & (plain["stage"] == 0))
    assert odd["logg"][dwarf].min() >= 4.0 and 5400 < np.median(odd["teff"][dwarf]) < 6400
    assert np.all(odd["logg"][emp & ~dwarf] <= 2.8)
