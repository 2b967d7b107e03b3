"""Preprocess (features) and the training-data loader, asserted on values."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from stellar.config import load_config
from stellar.features import (SCALAR_NAMES, Normaliser, Q_EDGE_SPIKE, Q_NO_XP, assign_split, finish_moments,
                              merge_moments, partial_moments, process_spectra, rebin, scalar_features)
from stellar.ingest.run import ingest
from stellar.instruments import load_instrument
from stellar.loader import FeatureDataset
from stellar.preprocess import preprocess
from stellar.tables import load_stats
from stellar.synth.survey import XP_DIR, run_survey
from stellar.tables import read_table

from conftest import ROOT, small_config


def pipeline(tmp: Path, survey: Path, instrument="gaia_rvs", **sets):
    over = [f"work_dir={tmp}", f"instrument={instrument}", f"ingest.gaia_root={survey}",
            f"ingest.labels=[{{path: {survey / 'labels' / 'allStar-synth.fits'}}}]"]
    cfg = load_config(ROOT / "conf" / "local.yaml", over + [f"{k}={v}" for k, v in sets.items()])
    inst = load_instrument(instrument)
    ingest(cfg.ingest, inst, cfg.conf_dir)
    summary = preprocess(cfg.preprocess, inst, cfg.ingest.output_dir)
    return cfg, summary


@pytest.fixture(scope="module")
def survey(tmp_path_factory, rvs_instrument):
    tmp = tmp_path_factory.mktemp("pre-survey")
    cfg = small_config(tmp, n_stars=1200, stars_per_file=300,
                       **{"synth.edge_spike_fraction": 0.05, "synth.nan_pixel_fraction": 0.1})
    return Path(run_survey(cfg.synth, rvs_instrument)["path"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, survey):
    tmp = tmp_path_factory.mktemp("pre")
    cfg, summary = pipeline(tmp, survey)
    feats = read_table(cfg.preprocess.output_dir, "features").sort_by("source_id")
    truth = pq.read_table(survey / "truth").to_pandas().set_index("source_id")
    return cfg, summary, feats, truth


def test_rebin_equals_numpy_reference():
    rng = np.random.default_rng(3)
    flux = rng.normal(1, 0.1, (7, 2401))
    ok = rng.random((7, 2401)) > 0.2
    ok[0, :30] = False  # a fully masked stretch
    got, count = rebin(flux, ok, 3)
    ref = np.where(ok, flux, np.nan)[:, :2400].reshape(7, 800, 3)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        expected = np.nanmean(ref, axis=2)
    assert got.shape == (7, 800)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.allclose(got[~np.isnan(got)], expected[~np.isnan(expected)])
    assert np.array_equal(count, (~np.isnan(ref)).sum(axis=2))


def test_masks_match_nan_pixels_and_spikes(tmp_path, survey):
    cfg, _ = pipeline(tmp_path, survey, **{"preprocess.rebin": 1})
    feats = read_table(cfg.preprocess.output_dir, "features").sort_by("source_id")
    rvs = read_table(cfg.ingest.output_dir, "rvs").sort_by("source_id")
    truth = pq.read_table(survey / "truth").to_pandas().set_index("source_id")
    sid = feats["source_id"].to_numpy()
    assert np.array_equal(sid, rvs["source_id"].to_numpy())
    mask = np.stack(feats["spectrum_mask"].to_numpy(zero_copy_only=False)).astype(bool)
    flux = np.stack(rvs["flux"].to_numpy(zero_copy_only=False))
    spike_truth = truth.loc[sid, "edge_spike"].to_numpy()
    clean = ~spike_truth
    assert np.array_equal(mask[clean], np.isnan(flux[clean]))  # mask == NaN pixels, exactly
    assert (np.isnan(flux).sum(axis=1) > 0).sum() > 50
    spec = np.stack(feats["spectrum"].to_numpy(zero_copy_only=False))
    assert np.all(spec[mask] == 1.0) and np.all(np.isfinite(spec))
    # injected edge spikes are found, and masked only at the edges
    flagged = (feats["quality"].to_numpy() & Q_EDGE_SPIKE) != 0
    assert flagged[spike_truth].mean() > 0.9
    assert (flagged & ~spike_truth).mean() < 0.02
    extra = mask & ~np.isnan(flux)
    assert not extra[:, 30:-30].any()


def test_features_content_and_accounting(built):
    cfg, summary, feats, truth = built
    c = summary["counts"]
    assert c["stars"] == feats.num_rows == 1200
    assert len(feats["spectrum"][0].as_py()) == 800 and len(feats["xp"][0].as_py()) == 110
    sid = feats["source_id"].to_numpy()
    has_bp = truth.loc[sid, "has_bp"].to_numpy()
    q = feats["quality"].to_numpy()
    assert np.array_equal((q & 2) != 0, ~has_bp)  # Q_NO_BP follows the missing BP band
    xp = np.stack(feats["xp"].to_numpy(zero_copy_only=False))
    assert np.all(xp[~has_bp, :55] == 0) and np.all(np.abs(xp[has_bp, 0]) > 0)
    snr = feats["snr"].to_numpy()
    assert np.allclose(snr, truth.loc[sid, "snr"].to_numpy(), rtol=1e-5)
    assert c["split:train"] + c["split:validation"] + c["split:test"] == c["usable_labels"]
    assert c["split:observed"] == 1200 - c["usable_labels"]


def test_label_cuts_remove_exactly_the_flagged_rows(built):
    cfg, summary, feats, truth = built
    labels = read_table(cfg.ingest.output_dir, "labels").to_pandas().set_index("source_id")
    f = feats.to_pandas().set_index("source_id")
    lab = labels.loc[labels.index.intersection(f.index)]
    cuts = cfg.preprocess.label_cuts
    bad = (lab.snr < cuts.min_snr) | ((lab.aspcapflag & (1 << 23)) != 0) | ((lab.starflag & ((1 << 3) | (1 << 4))) != 0)
    bad |= lab[["teff", "logg", "m_h", "alpha_m", "fe_h"]].isna().any(axis=1)
    expected_usable = set(lab.index[~bad])
    usable = set(f.index[f.split != "observed"])
    assert usable == expected_usable and len(usable) > 100
    cut = f.loc[lab.index[bad]]
    assert cut.label_cut_reason.notna().all() and (cut.split == "observed").all()
    n_cut = sum(v for k, v in summary["counts"].items() if k.startswith("cut:"))
    assert n_cut == bad.sum()
    assert f.loc[list(expected_usable)].label_cut_reason.isna().all()
    # labels pass through unchanged
    common = list(expected_usable)[:50]
    assert np.allclose(f.loc[common, "teff"], lab.loc[common, "teff"])


def test_impossible_catalogue_labels_never_train(tmp_path, survey, built):
    """A catalogue's sentinel (-9999) or a damaged value outside the physical envelope, and a negative
    label error, make the star unusable for training with the reason (it stays an observed star); the
    other stars' splits do not move."""
    from astropy.io import fits

    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    path = root / "labels" / "allStar-synth.fits"
    with fits.open(path) as hdul:
        t = hdul[1].data.copy()
        header = hdul[1].header
    _, _, feats, _ = built
    f = feats.to_pandas().set_index("source_id")
    usable = [int(x) for x in f.index[f.split != "observed"][:3]]
    row = {int(sid): i for i, sid in enumerate(t["GAIAEDR3_SOURCE_ID"])}
    t["TEFF"][row[usable[0]]] = -9999.0
    t["LOGG"][row[usable[1]]] = 99.0
    t["M_H_ERR"][row[usable[2]]] = -1.0
    fits.BinTableHDU(t, header=header).writeto(path, overwrite=True)
    cfg, summary = pipeline(tmp_path, root)
    g = read_table(cfg.preprocess.output_dir, "features").to_pandas().set_index("source_id")
    assert g.loc[usable[0], "label_cut_reason"] == "label teff outside the physical envelope"
    assert g.loc[usable[1], "label_cut_reason"] == "label logg outside the physical envelope"
    assert g.loc[usable[2], "label_cut_reason"] == "label m_h_err negative"
    assert (g.loc[usable, "split"] == "observed").all()
    others = f.index.difference(usable)
    assert (g.loc[others, "split"] == f.loc[others, "split"]).all()
    assert summary["counts"]["usable_labels"] == built[1]["counts"]["usable_labels"] - 3


def test_split_is_stable_across_partitionings(tmp_path, survey, built):
    _, _, feats, _ = built
    cfg2, s2 = pipeline(tmp_path, survey, **{"ingest.healpix_order": 3})
    other = read_table(cfg2.preprocess.output_dir, "features").sort_by("source_id")
    assert s2["partitions"] > built[1]["partitions"]
    assert feats["split"].to_pylist() == other["split"].to_pylist()
    split = assign_split(np.arange(1, 200001, dtype=np.int64) << 35, np.ones(200000, bool), 0.8, 0.1)
    frac = {s: (split == s).mean() for s in ("train", "validation", "test")}
    assert abs(frac["train"] - 0.8) < 0.005 and abs(frac["test"] - 0.1) < 0.005


def test_star_without_xp_is_kept_and_flagged(tmp_path, survey):
    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    victim = sorted((root / XP_DIR).glob("*.csv.gz"))[0]
    victim.unlink()
    (root / XP_DIR / "_MD5SUM.txt").unlink()
    cfg, s = pipeline(tmp_path, root)
    feats = read_table(cfg.preprocess.output_dir, "features")
    no_xp = (feats["quality"].to_numpy() & Q_NO_XP) != 0
    truth_file = pq.read_table(survey / "truth", columns=["file_index"]).to_pandas()
    assert feats.num_rows == 1200 and no_xp.sum() == (truth_file.file_index == 0).sum() == 1200 - s["counts"]["with_xp"]
    xp = np.stack(feats["xp"].to_numpy(zero_copy_only=False))
    assert np.all(xp[no_xp] == 0)


def test_normalisation_stats_and_round_trip(built):
    cfg, summary, feats, _ = built
    stats = load_stats(cfg.preprocess.output_dir)
    train = feats.filter(pc.equal(feats["split"], "train"))
    teff = train["teff"].to_numpy()
    i = stats["label_names"].index("teff")
    assert stats["labels"]["mean"][i] == pytest.approx(teff.mean(), rel=1e-6)
    assert stats["labels"]["std"][i] == pytest.approx(teff.std(), rel=1e-5)
    xp = np.stack(train["xp"].to_numpy(zero_copy_only=False)).astype(np.float64)
    assert np.allclose(stats["xp"]["mean"], xp.mean(axis=0), rtol=1e-5, atol=1e-9)
    norm = Normaliser.from_stats(stats["xp"])
    assert np.allclose(norm.denormalise(norm.normalise(xp)), xp, rtol=1e-5, atol=1e-6)
    # merging per-partition moments equals moments of the whole
    parts = [partial_moments(xp[i::3]) for i in range(3)]
    assert np.allclose(finish_moments(merge_moments(parts))["std"], finish_moments(partial_moments(xp))["std"])


def test_loader_epochs_shards_and_values(built):
    cfg, summary, feats, _ = built
    root = cfg.preprocess.output_dir
    train_ids = set(feats.filter(pc.equal(feats["split"], "train"))["source_id"].to_pylist())
    ds = FeatureDataset(root, split="train", batch_size=64, shuffle_buffer=256, seed=1)
    ids = torch.cat([b["source_id"] for b in ds]).tolist()
    assert sorted(ids) == sorted(train_ids)  # every training star exactly once per epoch
    again = torch.cat([b["source_id"] for b in FeatureDataset(root, split="train", batch_size=64,
                                                               shuffle_buffer=256, seed=1)]).tolist()
    assert again == ids
    ds.set_epoch(1)
    assert torch.cat([b["source_id"] for b in ds]).tolist() != ids
    shards = [set(torch.cat([b["source_id"] for b in FeatureDataset(root, split="train", batch_size=64, seed=1,
                                                                    rank=r, world_size=2)]).tolist())
              for r in (0, 1)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == train_ids
    b = next(iter(FeatureDataset(root, split="train", batch_size=32)))
    stats = load_stats(root)
    lab = Normaliser(np.asarray(stats["labels"]["mean"]), np.asarray(stats["labels"]["std"]))
    raw = feats.to_pandas().set_index("source_id").loc[b["source_id"].numpy(), stats["label_names"]].to_numpy()
    assert np.allclose(lab.denormalise(b["labels"].numpy()), raw, rtol=1e-4)
    assert b["spectrum"].shape == (32, 800) and b["spectrum_mask"].dtype == torch.bool


def test_second_instrument_goes_through(tmp_path, hr15n_instrument):
    cfg = small_config(tmp_path, n_stars=300, stars_per_file=150, instrument="ges_hr15n")
    survey = Path(run_survey(cfg.synth, hr15n_instrument)["path"])
    cfg, s = pipeline(tmp_path / "p", survey, instrument="ges_hr15n")
    feats = read_table(cfg.preprocess.output_dir, "features")
    assert feats.num_rows == 300 and len(feats["spectrum"][0].as_py()) == 3201 // 3
    assert "a_li" in feats.column_names
    stats = load_stats(cfg.preprocess.output_dir)
    assert stats["label_names"][-1] == "a_li" and len(stats["wavelength"]) == 1067
    assert s["counts"]["usable_labels"] > 20


def test_process_spectra_snr_and_errors():
    rng = np.random.default_rng(0)
    flux = np.ones((4, 300))
    err = np.full((4, 300), 0.02)
    noisy = flux + err * rng.standard_normal(flux.shape)
    res = process_spectra(noisy, err, 3, 30, 0.25, 5.0)
    assert np.allclose(res.snr, 50, rtol=0.05)
    assert np.allclose(res.error, 0.02 / np.sqrt(3), rtol=1e-6)
    assert res.mask.sum() == 0 and not res.spike.any()


def test_log_reduced_parallax_is_a_luminosity_scale_and_always_finite():
    """log10 of the reduced parallax where the parallax is significant (so 5 log10 differences are
    absolute-magnitude differences), finite and monotonic through zero and negative parallaxes, and 0
    (a missing value) only where the parallax or G is missing."""
    g = np.array([10.0, 15.0, 12.0, 12.0, 12.0, 12.0, 12.0, np.nan])
    plx = np.array([20.0, 2.0, 0.05, 0.0, -0.05, -0.5, np.nan, 1.0])
    err = np.full(8, 0.02)
    sc = scalar_features(g, g + 0.5, g - 0.5, plx, err)
    assert sc.shape == (8, len(SCALAR_NAMES))
    red, log_red = (sc[:, SCALAR_NAMES.index(k)] for k in ("reduced_parallax", "log_reduced_parallax"))
    np.testing.assert_allclose(log_red[:2], np.log10(plx[:2] * 10 ** (0.2 * g[:2]) / 100), atol=1e-4)
    np.testing.assert_allclose(red[:2], plx[:2] * 10 ** (0.2 * g[:2]) / 100, rtol=1e-6)
    # same G: larger parallax, larger value, through zero and below (no infinities, no NaN)
    assert np.all(np.diff(log_red[2:6]) < 0) and np.all(np.isfinite(log_red))
    # at zero parallax the softened log is log10 of the reduced parallax's error
    assert log_red[3] == pytest.approx(np.log10(0.02 * 10 ** 2.4 / 100), abs=1e-5)
    assert log_red[6] == 0.0 and log_red[7] == 0.0


@pytest.mark.spark
def test_spark_preprocess_equals_in_process(spark, tmp_path, built):
    import hashlib

    from stellar.runtime import SparkExecutor
    from stellar.tables import TableStore

    cfg, _, _, _ = built
    inst = load_instrument("gaia_rvs")
    out = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp_path}",
                                                     f"preprocess.output_dir={tmp_path / 'features'}"]).preprocess
    preprocess(out, inst, cfg.ingest.output_dir, mapper=SparkExecutor(spark))

    def digest(root):
        v = TableStore(root).table_path("features").parent
        return {str(p.relative_to(v)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(v.rglob("*")) if p.is_file() and p.name != "_manifest.json"}

    assert digest(tmp_path / "features") == digest(cfg.preprocess.output_dir)
    df = spark.read.parquet(str(TableStore(tmp_path / "features").table_path("features")))
    assert df.count() == 1200 and df.filter("split = 'train'").count() > 100
