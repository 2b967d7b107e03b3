"""Ingest of the real Gaia DR3 / APOGEE / GALAH samples in every format they come in."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from astropy.io import fits
from astropy.table import Table

from stellar.config import load_config
from stellar.ingest.run import ingest
from stellar.io.ecsv_writer import write_ecsv_gz
from stellar.io.gaia_schema import gaia_table
from stellar.tables import read_table

from conftest import ROOT

pytestmark = pytest.mark.realdata
XP_RAW = ["XP_CONTINUOUS_RAW.csv", "XP_CONTINUOUS_RAW.ecsv", "XP_CONTINUOUS_RAW.fits", "XP_CONTINUOUS_RAW.xml"]


def run(tmp: Path, datalink: list[Path], labels: list[tuple[Path, str]] | None = None, instrument=None, **sets):
    import json

    over = [f"work_dir={tmp}", "ingest.gaia_root=null", f"ingest.output_dir={tmp / 'tables'}",
            "ingest.datalink=[" + ",".join(json.dumps(str(p)) for p in datalink) + "]",
            "ingest.labels=[" + ",".join(json.dumps({"path": str(p), "catalogue": c}) for p, c in (labels or [])) + "]"]
    over += ["ingest.max_bad_fraction=1.0"] + [f"{k}={v}" for k, v in sets.items()]
    cfg = load_config(ROOT / "conf" / "local.yaml", over)
    from stellar.instruments import load_instrument

    summary = ingest(cfg.ingest, instrument or load_instrument("gaia_rvs"), cfg.conf_dir)
    return summary, tmp / "tables"


def copy(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest / f.name)
    return dest


def by_file(table: pa.Table, name: str) -> pa.Table:
    return table.filter(pc.match_substring(table["source_file"], name)).sort_by("source_id")


def test_same_xp_source_identical_from_csv_ecsv_fits_votable(tmp_path, real_data):
    folder = copy([real_data / "gaiaxpy_xp" / f for f in XP_RAW], tmp_path / "xp")
    summary, root = run(tmp_path, [folder])
    assert summary["tables"]["xp"] == {"rows_in": 8, "written": 2, "quarantined": 6}  # 4 copies of 2 sources
    xp = read_table(root, "xp")
    assert sorted(set(xp["source_id"].to_pylist())) == [5762406957886626816, 5853498713190525696]
    # the copies are duplicates: the first file (by name) wins, the rest are quarantined as such
    q = read_table(root, "quarantine")
    assert all("duplicate" in r for r in q["reason"].to_pylist())
    tables = {}
    for name in XP_RAW:
        s, r = run(tmp_path / name, [real_data / "gaiaxpy_xp" / name])
        assert s["quarantined"] == 0
        tables[name] = read_table(r, "xp").sort_by("source_id")
    ref = tables[XP_RAW[0]]
    for name, t in tables.items():
        for col in ("bp_coefficients", "rp_coefficients", "bp_coefficient_errors", "rp_coefficient_correlations",
                    "bp_n_relevant_bases", "rp_standard_deviation", "solution_id"):
            assert t[col].to_pylist() == ref[col].to_pylist(), (name, col)
    coeffs = np.asarray(ref["bp_coefficients"][1].as_py())
    assert coeffs.size == 55 and coeffs[0] == pytest.approx(56947.03696840172, rel=1e-15)


def test_datalink_xp_in_four_formats(tmp_path, real_data):
    d = real_data / "astroquery_gaia" / "datalink_5937083312263887616"
    results = []
    for ext in ("csv", "ecsv", "fits", "xml"):
        s, r = run(tmp_path / ext, [d / f"XP_CONTINUOUS-Gaia DR3 5937083312263887616.{ext}"])
        assert s["tables"]["xp"]["written"] == 1
        results.append(read_table(r, "xp"))
    for t in results[1:]:
        assert t["rp_coefficients"].to_pylist() == results[0]["rp_coefficients"].to_pylist()
        assert t["bp_coefficient_correlations"].to_pylist() == results[0]["bp_coefficient_correlations"].to_pylist()


def test_missing_bp_source_is_kept_and_marked(tmp_path, real_data):
    for name in ("XP_CONTINUOUS_RAW_with_missing_BP.csv", "XP_CONTINUOUS_RAW_with_missing_BP.ecsv"):
        s, root = run(tmp_path / name, [real_data / "gaiaxpy_xp" / name])
        assert s["tables"]["xp"] == {"rows_in": 3, "written": 3, "quarantined": 0}
        xp = read_table(root, "xp").sort_by("source_id")
        row = xp.filter(pc.equal(xp["source_id"], 5405570973190252288)).to_pylist()[0]
        assert row["has_bp"] is False and row["has_rp"] is True
        assert row["bp_coefficients"] is None and row["bp_n_relevant_bases"] is None
        assert len(row["rp_coefficients"]) == 55


def test_rvs_datalink_csv_fits_and_bulk_agree_and_keep_nans(tmp_path, real_data, rvs_instrument):
    csv_file = real_data / "gaiaspec_rvs" / "Kepler-93.csv"
    fits_file = real_data / "msc_adriana_rvs_fits" / "RVS-Gaia DR3 5839493134002800896.fits"
    s, root = run(tmp_path / "dl", [csv_file, fits_file])
    assert s["tables"]["rvs"] == {"rows_in": 2, "written": 2, "quarantined": 0}
    rvs = read_table(root, "rvs").sort_by("source_id")
    real_csv = Table.read(csv_file, format="ascii.csv")
    csv_flux = np.ma.filled(np.ma.asarray(real_csv["flux"], dtype=np.float64), np.nan).astype(np.float32)
    with fits.open(fits_file) as h:
        real_fits = np.asarray(h[1].data["flux"], dtype=np.float32)
    got = {r["source_id"]: r for r in rvs.to_pylist()}
    kep = got[2052747119115620352]
    flux = np.asarray(kep["flux"], dtype=np.float32)
    assert np.array_equal(np.isnan(flux), np.isnan(csv_flux))
    assert kep["n_nan_pixels"] == 7 and np.isnan(flux).sum() == 7
    assert np.array_equal(flux, csv_flux, equal_nan=True)
    rr = got[5839493134002800896]
    assert rr["n_nan_pixels"] == int(np.isnan(real_fits).sum()) == 112
    assert np.array_equal(np.asarray(rr["flux"], dtype=np.float32), real_fits, equal_nan=True)
    assert rr["combined_transits"] is not None and kep["combined_transits"] == 17

    # The bulk form of the same two stars (written as the archive writes RvsMeanSpectrum files).
    bulk = tmp_path / "bulk" / "Spectroscopy" / "rvs_mean_spectrum"
    cols = {name: rvs[name] for name in ("solution_id", "source_id", "ra", "dec", "flux", "flux_error",
                                          "combined_transits", "combined_ccds", "deblended_ccds")}
    write_ecsv_gz(bulk / "RvsMeanSpectrum_000000-786431.csv.gz", gaia_table("rvs_mean_spectrum"), cols, rvs.num_rows)
    sb, root_b = run(tmp_path / "b", [], **{"ingest.gaia_root": str(tmp_path / "bulk")})
    assert sb["tables"]["rvs"]["written"] == 2
    rb = read_table(root_b, "rvs").sort_by("source_id")
    for col in ("source_id", "flux", "flux_error", "n_nan_pixels", "combined_transits"):
        a, b = rb[col].to_pylist(), rvs[col].to_pylist()
        if col.startswith("flux"):
            assert all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(a, b))
        else:
            assert a == b


def test_apogee_and_galah_labels(tmp_path, real_data):
    apogee = real_data / "apogee_dr17_montalban_kepler" / "Montalban2021_X_APOGEE_DR17.fits"
    tutt_a = real_data / "apogee_galah_labels_tutt" / "Apogee_data_filtered_1612.fits"
    galah = real_data / "apogee_galah_labels_tutt" / "Galah_data_filtered_1061.fits"
    s, root = run(tmp_path, [], labels=[(apogee, "apogee_dr17"), (tutt_a, "apogee_dr17_lowercase"),
                                        (galah, "galah_dr3")])
    labels = read_table(root, "labels")
    with fits.open(apogee) as h:
        d = h[1].data
        sid, teff, mh, flag = (np.asarray(d[c]) for c in ("GAIAEDR3_SOURCE_ID", "TEFF", "M_H", "ASPCAPFLAG"))
    mont = by_file(labels, "Montalban")
    assert s["per_file"]["labels:Montalban2021_X_APOGEE_DR17.fits"]["rows_in"] == len(sid)
    order = np.argsort(sid)
    assert mont["source_id"].to_pylist() == sid[order].tolist()
    assert np.allclose(mont["teff"].to_numpy(), teff[order], equal_nan=True)
    assert np.allclose(mont["m_h"].to_numpy(zero_copy_only=False), mh[order], equal_nan=True)
    assert mont["aspcapflag"].to_pylist() == flag[order].tolist()
    assert set(mont["catalogue"].to_pylist()) == {"apogee_dr17"}
    with fits.open(galah) as h:
        g = h[1].data
        gsid, gteff, galpha, gflag = (np.asarray(g[c]) for c in ("dr3_source_id", "teff", "alpha_fe", "flag_sp"))
    gl = by_file(labels, "Galah")
    # 12 stars are in both APOGEE tables and GALAH: duplicates across catalogues are quarantined, not lost
    n_in = s["per_file"]["labels:Galah_data_filtered_1061.fits"]
    assert n_in["rows_in"] == len(gsid) == n_in["written"] + n_in["quarantined"]
    row = gl.to_pylist()[0]
    i = int(np.flatnonzero(gsid == row["source_id"])[0])
    assert row["teff"] == pytest.approx(gteff[i]) and row["alpha_m"] == pytest.approx(galpha[i])
    assert row["flag_sp"] == gflag[i] and row["m_h"] is None
    assert s["written"] + s["quarantined"] == s["rows_in"]


def test_gaia_source_query_products(tmp_path, real_data):
    ecsv = real_data / "astroquery_gaia" / "1712337806100O-result.ecsv"
    vot = real_data / "astroquery_gaia" / "1710099405832VAL-result.vot"
    s, root = run(tmp_path, [ecsv, vot])
    ast = read_table(root, "astrometry").sort_by("source_id")
    assert s["tables"]["astrometry"] == {"rows_in": 7, "written": 7, "quarantined": 0}
    ref = Table.read(ecsv, format="ascii.ecsv")
    row = next(r for r in ast.to_pylist() if r["source_id"] == int(ref["source_id"][0]))
    assert row["parallax"] == pytest.approx(float(ref["parallax"][0]))
    assert row["phot_g_mean_mag"] == pytest.approx(float(ref["phot_g_mean_mag"][0]))
    assert 4583627001381815936 in ast["source_id"].to_pylist()
