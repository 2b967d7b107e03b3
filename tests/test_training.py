"""The hybrid CNN ensemble: determinism, persistence without pickle, accuracy and calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stellar.config import load_config
from stellar.ingest.run import ingest
from stellar.model import ModelConfig, gaussian_nll
from stellar.preprocess import load_stats, preprocess
from stellar.synth.survey import run_survey
from stellar.training import Ensemble, evaluate, load_split, outlier_members, train_member

from conftest import ROOT, small_config


@pytest.fixture(scope="module")
def features(tmp_path_factory, rvs_instrument):
    """A 4000-star survey with 60 % labelled stars, ingested and preprocessed."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = small_config(tmp, n_stars=4000, stars_per_file=1000, **{"synth.training_fraction": 0.6})
    run_survey(cfg.synth, rvs_instrument)
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp}"])
    ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    preprocess(cfg.preprocess, rvs_instrument, cfg.ingest.output_dir)
    stats = load_stats(cfg.preprocess.output_dir)
    return cfg.preprocess.output_dir, stats


def test_nll_ignores_missing_labels_and_adds_label_noise():
    mean = torch.zeros(2, 2)
    log_var = torch.zeros(2, 2)
    target = torch.tensor([[1.0, float("nan")], [1.0, 2.0]])
    nll = gaussian_nll(mean, log_var, target)
    assert float(nll) == pytest.approx((0.5 + 0.5 + 2.0) / 3)
    with_err = gaussian_nll(mean, log_var, target, torch.ones(2, 2))
    assert float(with_err) < float(nll)


def test_outlier_rule():
    assert outlier_members([1.0, 1.02, 0.98, 1.01, 3.0]) == [4]
    assert outlier_members([1.0, 1.0, 1.0]) == []


def test_same_seed_same_weights_and_save_load(features, tmp_path):
    root, stats = features
    cfg = ModelConfig(max_epochs=2, patience=2)
    labels = stats["label_names"]
    a = train_member(root, cfg, labels, stats, 0, seed=7, threads=1)
    b = train_member(root, cfg, labels, stats, 0, seed=7, threads=1)
    c = train_member(root, cfg, labels, stats, 0, seed=8, threads=1)
    assert a.weights == b.weights and a.weights != c.weights
    ens = Ensemble(cfg, labels, stats, [a.weights, c.weights], calibration=np.array([1.1, 0.9, 1.0, 1.2, 0.8]))
    test = load_split(root, "test", labels, stats)
    before = ens.predict(test)
    loaded = Ensemble.load(ens.save(tmp_path / "ens"))
    after = loaded.predict(test)
    assert np.array_equal(before["mean"], after["mean"]) and np.array_equal(before["sigma"], after["sigma"])
    assert not any(p.suffix in (".pkl", ".pt", ".pickle") for p in (tmp_path / "ens").iterdir())


@pytest.mark.slow
def test_small_ensemble_is_accurate_and_calibrated(features):
    root, stats = features
    labels = stats["label_names"]
    cfg = ModelConfig(max_epochs=25, patience=5)
    members = [train_member(root, cfg, labels, stats, i, seed=100 + i, threads=1) for i in range(2)]
    ens = Ensemble(cfg, labels, stats, [m.weights for m in members])
    ens.calibrate(load_split(root, "validation", labels, stats))
    ev = evaluate(ens, load_split(root, "test", labels, stats))
    assert ev["teff/snr_50_inf/rmse"] < 150.0
    assert ev["logg/snr_50_inf/rmse"] < 0.3 and ev["m_h/snr_50_inf/rmse"] < 0.3  # sanity; accuracy: benchmarks
    for lab in labels:
        assert 0.75 < ev[f"{lab}/all/z_std"] < 1.3, (lab, ev[f"{lab}/all/z_std"])
        assert 0.55 < ev[f"{lab}/all/coverage68"] < 0.82
