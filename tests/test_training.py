"""The hybrid CNN ensemble: determinism, persistence without pickle, accuracy and calibration."""

from __future__ import annotations


from pathlib import Path

import numpy as np
import pytest
import torch

from stellar.config import load_config
from stellar.ingest.run import ingest
from stellar.model import ModelConfig, gaussian_nll
from stellar.preprocess import preprocess
from stellar.tables import load_stats
from stellar.synth.survey import run_survey
from stellar.ensemble import Ensemble, evaluate, load_split, outlier_members, train_member

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


def test_weighted_nll_is_a_weighted_mean():
    mean, log_var = torch.zeros(2, 1), torch.zeros(2, 1)
    target = torch.tensor([[1.0], [3.0]])
    w = torch.tensor([3.0, 1.0])
    assert float(gaussian_nll(mean, log_var, target, weight=w)) == pytest.approx((3 * 0.5 + 1 * 4.5) / 4)
    assert float(gaussian_nll(mean, log_var, target, weight=torch.ones(2))) == \
        pytest.approx(float(gaussian_nll(mean, log_var, target)))


def test_beta_nll_gives_unsure_terms_back_their_mean_gradient():
    """beta-NLL: each term's mean gradient is the plain NLL's times var ** beta (beta = 1: the squared
    error's), the variance's optimum stays at the squared residual, and beta 0 is the plain NLL."""
    target = torch.tensor([[1.0, 1.0]])
    log_var = torch.log(torch.tensor([[0.01, 1.0]]))  # one sure term, one unsure
    grads = {}
    for beta in (0.0, 0.5, 1.0):
        mean = torch.zeros(1, 2, requires_grad=True)
        gaussian_nll(mean, log_var, target, beta=beta).backward()
        grads[beta] = mean.grad[0].numpy()
    np.testing.assert_allclose(grads[0.0], [-100.0 / 2, -1.0 / 2], rtol=1e-5)  # diff / var, mean of 2
    np.testing.assert_allclose(grads[1.0], [-1.0 / 2, -1.0 / 2], rtol=1e-5)  # the squared error's
    np.testing.assert_allclose(grads[0.5], [-10.0 / 2, -1.0 / 2], rtol=1e-5)
    # the variance's optimum is the squared residual whatever beta
    lv = torch.zeros(1, 1, requires_grad=True)
    opt = torch.optim.Adam([lv], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        gaussian_nll(torch.zeros(1, 1), lv, torch.tensor([[0.5]]), beta=0.5).backward()
        opt.step()
    assert float(lv.exp()) == pytest.approx(0.25, rel=0.02)
    mean, lv0 = torch.zeros(2, 1), torch.zeros(2, 1)
    tgt = torch.tensor([[1.0], [3.0]])
    assert float(gaussian_nll(mean, lv0, tgt, beta=0.0)) == float(gaussian_nll(mean, lv0, tgt))


def test_head_dropout_is_set_apart_from_the_spectrum_features_dropout():
    """``head_dropout`` sets the fused head's dropout alone (None: ``dropout``); the flattened conv
    features keep ``dropout``. Checked on the modules and on train-mode forwards."""
    from torch import nn

    from stellar.model import HybridNet, load_model_preset

    base = load_model_preset("hybrid")

    def net(**update):
        torch.manual_seed(0)
        return HybridNet(base.model_copy(update=update), 801, 110, 7, 5)

    def head_rates(n):
        return [m.p for m in n.head if isinstance(m, nn.Dropout)]

    n = net(dropout=0.2, head_dropout=0.0)
    assert isinstance(n.conv_dropout, nn.Dropout) and n.conv_dropout.p == 0.2 and head_rates(n) == []
    assert head_rates(net(dropout=0.2, head_dropout=None)) == [0.2] * len(base.head)
    g = torch.Generator().manual_seed(1)
    x = (1 + 0.1 * torch.randn(16, 801, generator=g), torch.zeros(16, 801, dtype=torch.bool),
         torch.randn(16, 110, generator=g), torch.randn(16, 7, generator=g))
    quiet = net(dropout=0.0, head_dropout=0.0).train()
    assert torch.equal(quiet(*x)[0], quiet(*x)[0])  # nothing random left in train mode
    noisy = net(dropout=0.0, head_dropout=0.3).train()
    assert isinstance(noisy.conv_dropout, nn.Identity) and head_rates(noisy) == [0.3] * len(base.head)
    assert not torch.equal(noisy(*x)[0], noisy(*x)[0])


def test_label_balance_weights_favour_the_sparse_tail():
    from stellar.balance import label_density_weights, weight_lookup

    rng = np.random.default_rng(3)
    y = np.concatenate([rng.normal(0.0, 0.3, (3000, 3)), rng.normal(-2.5, 0.3, (60, 3))])
    y[::50, 2] = np.nan  # a missing label counts as the mean, not as an error
    w = label_density_weights(y, power=0.5, cap=5.0)
    assert w.shape == (3060,) and np.isfinite(w).all()
    assert w.mean() == pytest.approx(1.0)
    assert w[3000:].mean() > 2.5 * w[:3000].mean()  # the tail weighs more per star
    assert w.max() / w.min() <= 25.0 + 1e-9  # clipped to [1/cap, cap] before the mean is set to 1
    assert np.array_equal(label_density_weights(y, 0.5, 5.0), w)  # deterministic
    assert np.all(label_density_weights(y, 0.0, 5.0) == 1.0)
    of = weight_lookup(np.array([30, 10, 20]), np.array([3.0, 1.0, 2.0]))
    assert of(np.array([10, 20, 30, 40])).tolist() == [1.0, 2.0, 3.0, 1.0]


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
    plain = ens.predict(test)
    # a mean correction (fit_mean_correction's form): +0.02 + 0.01 u on the second label, saved and applied
    ens.mean_coef[1, 0], ens.mean_coef[1, 2] = 0.02, 0.01
    ens.mean_range = np.tile([-3.0, 3.0], (len(labels), 1))
    before = ens.predict(test)
    u = (plain["mean"][:, 1] - ens.label_mean[1]) / ens.label_std[1]
    assert np.allclose((before["mean"][:, 1] - plain["mean"][:, 1]) / ens.label_std[1],
                       0.02 + 0.01 * np.clip(u, -3, 3), atol=1e-6)
    assert np.array_equal(before["mean"][:, [0, 2, 3, 4]], plain["mean"][:, [0, 2, 3, 4]])
    loaded = Ensemble.load(ens.save(tmp_path / "ens"))
    after = loaded.predict(test)
    assert np.array_equal(before["mean"], after["mean"]) and np.array_equal(before["sigma"], after["sigma"])
    assert not any(p.suffix in (".pkl", ".pt", ".pickle") for p in (tmp_path / "ens").iterdir())


def _assert_option_is_deterministic_and_acts(root, stats, **option):
    """A one-epoch member trained with the ModelConfig ``option`` is the same on a rerun and differs from
    one trained without it (same seed)."""
    labels = stats["label_names"]
    cfg = ModelConfig(max_epochs=1, patience=1, **option)
    a = train_member(root, cfg, labels, stats, 0, seed=7, threads=1)
    b = train_member(root, cfg, labels, stats, 0, seed=7, threads=1)
    c = train_member(root, ModelConfig(max_epochs=1, patience=1), labels, stats, 0, seed=7, threads=1)
    assert a.weights == b.weights and a.weights != c.weights


def test_snr_augmentation_brings_spectra_to_the_catalogues_snr():
    """stellar.augment.degrade_spectra: about ``rate`` of the stars get noise that takes them to a drawn
    catalogue S/N (the residual scatter is error * s0 / s), stars already fainter than their draw and the
    rest are untouched, and the same generator seed gives the same spectra."""
    from stellar.augment import degrade_spectra

    n, p = 3000, 400
    q = torch.linspace(10.0, 60.0, 101, dtype=torch.float64)
    snr = torch.where(torch.arange(n) % 3 == 0, 40.0, 200.0).to(torch.float64)  # a third inside the range
    err = (1.0 / snr).to(torch.float32)[:, None].expand(n, p).contiguous()
    runs = []
    for _ in range(2):
        spec = torch.ones(n, p)
        runs.append((spec, degrade_spectra(spec, err, snr, q, 0.4, torch.Generator().manual_seed(11))))
    (spec, now), (spec2, now2) = runs
    assert torch.equal(spec, spec2) and torch.equal(now, now2)
    changed = (spec != 1.0).any(1)
    assert torch.equal(changed, now < snr)
    bright = snr == 200.0
    assert abs(float(changed[bright].float().mean()) - 0.4) < 0.04  # every draw is below 200
    assert float(changed[~bright].float().mean()) < 0.4 * 0.7  # draws above 40 leave those stars alone
    assert float(now[changed].min()) >= 10.0 and float(now[changed].max()) <= 60.0
    # the spectra were noiseless: the added scatter is error * sqrt((s0 / s)^2 - 1), which with the star's
    # own noise (error) makes error * s0 / s
    added = (spec[changed] - 1.0).std(1).double()
    expected = (1.0 / snr[changed]) * torch.sqrt((snr[changed] / now[changed]) ** 2 - 1.0)
    ratio = added / expected
    assert abs(float(ratio.mean()) - 1.0) < 0.01 and float(ratio.std()) < 0.06
    untouched = torch.ones(n, p)
    degrade_spectra(untouched, err, snr, q, 0.0, torch.Generator().manual_seed(11))
    assert torch.equal(untouched, torch.ones(n, p))


def test_noise_excess_recovers_correlated_noise_and_passes_honest_errors():
    """stellar.augment.spectrum_noise_excess: noise 1.5x its quoted errors, neighbour-correlated 0.3,
    over a model that misfits by a constant 0.004, is read as excess 2.25 and lag1 0.3; honest white
    noise as excess 1 and lag1 0."""
    from stellar.augment import spectrum_noise_excess

    rng = np.random.default_rng(21)
    n, p = 600, 300
    model = 1.0 - 0.3 * np.exp(-0.5 * ((np.arange(p) - 150) / 4.0) ** 2)[None, :].repeat(n, 0)
    snr = np.exp(rng.uniform(np.log(15), np.log(300), n))
    err = (1.0 / snr)[:, None] * np.ones((1, p))
    a = (1.0 - np.sqrt(1.0 - 2.0 * 0.3**2)) / (2.0 * 0.3)  # kernel (a, 1, a): lag-1 correlation 0.3
    w = rng.standard_normal((n, p + 2))
    corr = (a * w[:, :-2] + w[:, 1:-1] + a * w[:, 2:]) / np.sqrt(1 + 2 * a * a)
    misfit = 0.004 * rng.standard_normal((n, p))
    mask = np.zeros((n, p), np.uint8)
    excess, lag1 = spectrum_noise_excess(model + misfit + 1.5 * err * corr, err, mask, model)
    assert excess == pytest.approx(2.25, rel=0.1) and lag1 == pytest.approx(0.3, abs=0.05)
    excess, lag1 = spectrum_noise_excess(model + misfit + err * rng.standard_normal((n, p)), err, mask, model)
    assert excess == pytest.approx(1.0, abs=0.08) and lag1 < 0.05


def test_degraded_copies_are_as_noisy_as_real_stars_of_their_snr():
    """stellar.augment.degraded_copies: each copy's added noise has variance excess * ((s0/s)^2 - 1) *
    error^2 and the asked correlation, its quoted errors grow by s0/s, only copies below the star's S/N
    are kept, and the same seed gives the same copies; move_away makes G fainter by ln(s/s0) / dlnS/N/dG,
    keeps the reduced parallax on average and grows the parallax error as the survey's does."""
    from stellar.augment import degraded_copies, fainter_star_model, move_away
    from stellar.features import SCALAR_NAMES, Normaliser, scalar_features

    rng = np.random.default_rng(4)
    n, p = 400, 200
    g = rng.uniform(9.0, 14.0, n)
    snr0 = np.exp(7.5 - 0.45 * g + 0.05 * rng.standard_normal(n))
    plx_err = np.exp(-4.0 + 0.2 * g)
    plx = rng.uniform(0.5, 5.0, n)
    phys = scalar_features(g, g + 0.4, g - 0.5, plx, plx_err).astype(np.float64)
    d_snr, d_plx = fainter_star_model(phys, snr0)
    assert d_snr == pytest.approx(-0.45, abs=0.02) and d_plx == pytest.approx(0.2, abs=0.02)
    stats = {"mean": phys.mean(0).tolist(), "std": (phys.std(0) + 1e-9).tolist()}
    data = {"spectrum": torch.ones(n, p), "spectrum_error": torch.full((n, p), 0.01),
            "snr": torch.from_numpy(snr0.astype(np.float32)), "source_id": torch.arange(n),
            "scalars": torch.from_numpy(Normaliser.from_stats(stats).normalise(phys))}
    q = torch.linspace(5.0, 20.0, 101, dtype=torch.float64)
    c = degraded_copies(data, q, 3, seed=1, excess=2.0, lag1=0.25, fainter=(stats, (d_snr, d_plx)))
    c2 = degraded_copies(data, q, 3, seed=1, excess=2.0, lag1=0.25, fainter=(stats, (d_snr, d_plx)))
    assert all(torch.equal(c[k], c2[k]) for k in c)
    src = c["source_id"].numpy()
    s0, s = snr0[src], c["snr"].numpy().astype(np.float64)
    assert len(src) > n and np.all(s < s0 * (1 + 1e-6))
    k = s0 / s
    np.testing.assert_allclose(c["spectrum_error"].numpy()[:, 0], 0.01 * k, rtol=1e-4)
    noise = (c["spectrum"].numpy() - 1.0) / (0.01 * np.sqrt(np.maximum(k**2 - 1.0, 1e-12)))[:, None]
    big = k > 1.5
    assert noise[big].var() == pytest.approx(2.0, rel=0.05)
    lag = np.mean(noise[big][:, 1:] * noise[big][:, :-1]) / noise[big].var()
    assert lag == pytest.approx(0.25, abs=0.03)
    out = Normaliser.from_stats(stats).denormalise(c["scalars"].numpy())
    i = SCALAR_NAMES.index
    np.testing.assert_allclose(out[:, i("phot_g_mean_mag")] - g[src], np.log(s / s0) / d_snr, atol=1e-4)
    np.testing.assert_allclose(out[:, i("parallax_error")], plx_err[src] * np.exp(d_plx * np.log(s / s0) / d_snr),
                               rtol=1e-4)
    np.testing.assert_allclose(out[:, i("bp_rp")], phys[src, i("bp_rp")], atol=1e-4)
    rel = out[:, i("reduced_parallax")] / phys[src, i("reduced_parallax")]
    assert abs(np.mean(rel) - 1.0) < 0.02  # the same luminosity, further away
    # a star without a parallax keeps its (zero-filled) parallax columns
    blank = phys.copy()
    blank[:, [i("parallax"), i("parallax_error"), i("reduced_parallax"), i("log_reduced_parallax")]] = 0.0
    moved = move_away(torch.from_numpy(Normaliser.from_stats(stats).normalise(blank)), stats, snr0, snr0 / 2,
                      (d_snr, d_plx), torch.Generator().manual_seed(0))
    back = Normaliser.from_stats(stats).denormalise(moved.numpy())
    assert np.allclose(back[:, i("parallax")], 0.0, atol=1e-4) and np.allclose(back[:, i("parallax_error")], 0.0, atol=1e-4)


def test_snr_augmented_training_is_deterministic_and_reads_the_catalogues_snr(features):
    """ModelConfig.snr_augment: the target S/N distribution is every star's in the features table, and a
    member trained with it is the same on a rerun and differs from one trained without it."""
    import pyarrow.dataset as pads

    from stellar.augment import catalogue_snr_quantiles
    from stellar.tables import TableStore

    root, stats = features
    snr = pads.dataset(TableStore(root).table_path("features"), format="parquet",
                       partitioning="hive").to_table(columns=["snr"]).column("snr").to_numpy()
    assert len(snr) == 4000
    assert np.allclose(catalogue_snr_quantiles(root), np.quantile(snr[np.isfinite(snr)], np.linspace(0, 1, 101)))
    _assert_option_is_deterministic_and_acts(root, stats, snr_augment=0.5)


def test_learning_rate_falls_only_when_the_validation_loss_stalls(features):
    """ModelConfig.lr_factor / lr_patience: with patience 0 the rate is multiplied by the factor after
    every epoch that sets no new best validation loss, and kept after every one that does; a factor of
    1 (the default) keeps the rate constant."""
    root, stats = features
    labels = stats["label_names"]
    # Whether a run stalls depends on the CPU's floating-point paths (one CPU's 8 epochs at 0.01 never
    # stalled): the rule is checked on every run, and rising rates are tried until one stalls, so the
    # test always sees both branches of the rule.
    stalled = 0
    for rate in (0.01, 0.03, 0.1):
        cfg = ModelConfig(max_epochs=8, patience=8, learning_rate=rate, lr_factor=0.5, lr_patience=0)
        hist = train_member(root, cfg, labels, stats, 0, seed=3, threads=1).history
        assert len(hist) == 8 and hist[0]["learning_rate"] == pytest.approx(rate)
        best = np.inf
        for now, nxt in zip(hist, hist[1:]):
            improved = now["val_loss"] < best - 1e-5
            best = min(best, now["val_loss"])
            stalled += not improved
            assert nxt["learning_rate"] == pytest.approx(now["learning_rate"] * (1.0 if improved else 0.5))
        if stalled:
            break
    assert stalled >= 1, "no rate up to 0.1 stalled in 8 epochs; the test would not test the decay"
    for h in hist:  # each label's own validation NLL; the stopping loss is their (presence-weighted) mean
        by = h["val_loss_by_label"]
        assert list(by) == list(labels) and min(by.values()) - 1e-6 <= h["val_loss"] <= max(by.values()) + 1e-6
    flat = train_member(root, ModelConfig(max_epochs=3, patience=3), labels, stats, 0, seed=3, threads=1).history
    assert [h["learning_rate"] for h in flat] == [pytest.approx(1e-3)] * 3


def test_shift_weights_recover_a_known_density_ratio():
    """stellar.shift.density_ratio_weights: for a training sample N(0, 1) and a catalogue N(0.5, 1) the
    density ratio is exp(0.5 x - 0.125); the fitted log weights follow 0.5 x (slope within 10 %), power
    scales the log weights, the cap bounds them, power 0 gives equal weights, and the mean is 1."""
    from stellar.shift import density_ratio_weights

    rng = np.random.default_rng(5)
    xt = rng.normal(0.0, 1.0, (4000, 2))
    xc = np.column_stack([rng.normal(0.5, 1.0, 20000), rng.normal(0.0, 1.0, 20000)])
    w = density_ratio_weights(xt, xc, power=1.0, cap=100.0)
    assert w.mean() == pytest.approx(1.0)
    slope = np.polyfit(xt[:, 0], np.log(w), 1)[0]
    assert slope == pytest.approx(0.5, rel=0.1)
    assert abs(np.corrcoef(xt[:, 1], np.log(w))[0, 1]) < 0.1  # the second coordinate is not shifted
    half = density_ratio_weights(xt, xc, power=0.5, cap=100.0)
    assert np.polyfit(xt[:, 0], np.log(half), 1)[0] == pytest.approx(slope / 2, rel=0.05)
    capped = density_ratio_weights(xt, xc, power=1.0, cap=1.5)
    assert capped.max() / capped.min() <= 1.5**2 + 1e-9 and capped.max() / capped.min() > 2.0
    assert np.array_equal(density_ratio_weights(xt, xc, power=0.0, cap=5.0), np.ones(len(xt)))


def test_shift_weighted_training_reads_the_catalogue_and_is_deterministic(features):
    """ModelConfig.catalogue_weight: one weight per training star (mean 1, the train split's ids, the same
    on a rerun, within the cap), and a member trained with them the same on a rerun and different from one
    trained without."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from stellar.shift import _weights_of_table, catalogue_shift_weights
    from stellar.tables import TableStore

    root, stats = features
    sid, w = catalogue_shift_weights(root, 1.0, 5.0)
    path = TableStore(root).table_path("features")
    t = pads.dataset(path, format="parquet", partitioning="hive").to_table(
        columns=["source_id"], filter=pc.field("split") == "train")
    assert sorted(sid) == sorted(t.column("source_id").to_numpy()) and np.all(np.isfinite(w))
    assert w.mean() == pytest.approx(1.0) and w.max() / w.min() <= 5.0**2 + 1e-9 and w.std() > 0.05
    sid2, w2 = _weights_of_table.__wrapped__(str(path), 1.0, 5.0)  # computed afresh, not the cached answer
    assert np.array_equal(sid, sid2) and np.array_equal(w, w2)
    assert catalogue_shift_weights(root, 1.0, 5.0)[1] is w and not w.flags.writeable  # once per process
    _assert_option_is_deterministic_and_acts(root, stats, catalogue_weight=1.0)


def test_branch_heads_train_but_never_change_a_prediction(features):
    """ModelConfig.branch_loss: each branch's own head is trained (its weights move, its loss falls
    below the untrained head's), while prediction reads the joint head only: the stacked ensemble
    gives the members' own forward, and the branch heads' weights have no effect on it."""
    from stellar.ensemble import build_net
    from stellar.model import StackedEnsemble
    from safetensors.torch import load as st_load

    root, stats = features
    labels = stats["label_names"]
    cfg = ModelConfig(max_epochs=3, patience=3, branch_loss=0.5)
    member = train_member(root, cfg, labels, stats, 0, seed=3, threads=1)
    net = build_net(cfg, stats, labels)
    torch.manual_seed(3)
    fresh = build_net(cfg, stats, labels).eval()
    net.load_state_dict(st_load(member.weights))
    net.eval()
    assert len(net.branch_heads) == 3
    val = load_split(root, "validation", labels, stats)
    x = [val[k] for k in ("spectrum", "spectrum_mask", "xp", "scalars")]
    with torch.no_grad():
        mean, log_var, heads = net.forward_with_branches(*x)
        ref = net(*x)
        _, _, fresh_heads = fresh.forward_with_branches(*x)
        for (m, lv), (m0, lv0) in zip(heads, fresh_heads):
            assert float(gaussian_nll(m, lv, val["labels"])) < float(gaussian_nll(m0, lv0, val["labels"])) - 0.1
        assert torch.equal(mean, ref[0]) and torch.equal(log_var, ref[1])
        stacked_m, _ = StackedEnsemble([net]).eval()(*x)
        np.testing.assert_allclose(stacked_m[0].numpy(), ref[0].numpy(), rtol=1e-5, atol=1e-5)
        for head in net.branch_heads:
            head.weight.mul_(-3.0)
        assert torch.equal(net(*x)[0], ref[0])


def test_members_report_every_epoch_to_the_progress_line(features, tmp_path, monkeypatch):
    """Each epoch leaves the member's record (epoch, validation loss, best so far); the driver's progress
    line shows the running members' epochs and then the members done, and the records do not change the
    member (same weights with and without)."""
    from stellar.ensemble import member_progress_line
    from stellar.pipeline import Progress

    root, stats = features
    cfg = ModelConfig(max_epochs=3, patience=3)
    labels = stats["label_names"]
    folder = tmp_path / "progress"
    assert member_progress_line(folder, 2) is None  # nothing yet: no detail, the plain line
    seen = []
    import json as _json

    from stellar import ensemble as ens_mod

    real = ens_mod.write_member_progress

    def spy(f, index, record):  # the real writer, and the line as the driver would read it after each epoch
        real(f, index, record)
        seen.append((record["epoch"], member_progress_line(f, 2)))

    monkeypatch.setattr(ens_mod, "write_member_progress", spy)
    a = train_member(root, cfg, labels, stats, 0, seed=7, threads=1, progress=str(folder))
    monkeypatch.undo()
    assert [e for e, _ in seen] == [0, 1, 2]
    assert seen[0][1].startswith("members 0/2 done, epoch 1 of <=3, best val loss ")
    assert seen[1][1].startswith("members 0/2 done, epoch 2 of <=3")
    assert seen[2][1].startswith("members 1/2 done, best val loss ")
    rec = _json.loads((folder / "member-0.json").read_text())
    assert rec["done"] and rec["epoch"] == 2 and rec["best_val_loss"] == pytest.approx(a.best_val_loss)
    assert train_member(root, cfg, labels, stats, 0, seed=7, threads=1).weights == a.weights
    p = Progress()
    p.start("train", None, lambda: member_progress_line(folder, 2))
    p.stop()
    assert p.line().startswith("  [train] starting, 0:00 elapsed; members 1/2 done, best val loss ")


def test_pretraining_shows_on_the_progress_line_and_in_the_member_record(features, tmp_path, monkeypatch):
    """With pretrain_epochs the progress line first counts the pre-training epochs (no validation loss yet),
    then the supervised ones; the member keeps each pre-training epoch's loss and the time it took."""
    from stellar import ensemble as ens_mod
    from stellar.ensemble import member_progress_line

    root, stats = features
    folder = tmp_path / "progress"
    seen = []
    real = ens_mod.write_member_progress

    def spy(f, index, record):
        real(f, index, record)
        seen.append(member_progress_line(f, 2))

    monkeypatch.setattr(ens_mod, "write_member_progress", spy)
    m = train_member(root, ModelConfig(max_epochs=2, patience=2, pretrain_epochs=2), stats["label_names"], stats, 0,
                     seed=7, threads=1, progress=str(folder))
    monkeypatch.undo()
    assert seen[0] == "members 0/2 done, pre-training epoch 1 of 2"
    assert seen[1] == "members 0/2 done, pre-training epoch 2 of 2"
    assert seen[2].startswith("members 0/2 done, epoch 1 of <=2, best val loss ")
    assert seen[3].startswith("members 1/2 done, best val loss ")
    assert len(m.pretrain_losses) == 2 and all(np.isfinite(m.pretrain_losses))
    assert 0 < m.pretrain_seconds < m.seconds


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


def _cfg(tmp_path, features_root, *sets):
    return load_config(ROOT / "conf" / "local.yaml", [
        f"work_dir={tmp_path}", f"preprocess.output_dir={features_root}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"mlflow.artifact_root={tmp_path}/mlartifacts",
        "train.members=3", "train.model_overrides={max_epochs: 2, patience: 2, pretrain_epochs: 1}", *sets])


def test_register_load_by_alias_identical_predictions(features, tmp_path, rvs_instrument):
    import mlflow

    from stellar.errors import StellarError
    from stellar.registry import load_registered
    from stellar.train import train_ensemble

    root, stats = features
    cfg = _cfg(tmp_path, root)
    summary = train_ensemble(cfg, rvs_instrument)
    ens = summary["ensemble"]
    assert summary["version"] == 1 and summary["alias"] == "challenger" and summary["kept"] >= 2
    # the calibration's faint copies were made and measured: the test survey's noise is white and its
    # errors honest (excess ~1, no pixel correlation); its S/N falls and its parallax error grows with G
    val = load_split(root, "validation", ens.labels, stats)
    cc = ens.meta["calibration_copies"]
    assert cc["copies"] == 4 and cc["made"] > len(val["snr"])
    assert 1.0 <= cc["noise_excess"] < 1.3 and cc["noise_lag1"] < 0.1, cc
    assert cc["dln_snr_dG"] < -0.2 and cc["dln_parallax_error_dG"] > 0.0, cc
    # the published calibration is fitted on the validation and test stars together, after the test
    # metrics were taken with one fitted on the validation stars alone
    test = load_split(root, "test", ens.labels, stats)
    cs = ens.meta["calibration_stars"]
    assert (cs["validation"], cs["test"]) == (len(val["snr"]), len(test["snr"])) and cs["kept"] > len(val["snr"]), cs
    assert summary["snr_calibration"] == ens.snr_calibration()
    assert ens.meta["held_out_z_std"] == {lab: round(summary["metrics"][f"{lab}/all/z_std"], 5) for lab in ens.labels}
    loaded, ident = load_registered(cfg, "challenger")
    assert ident["version"] == 1 and ident["run_id"] == summary["run_id"]
    a, b = ens.predict(test), loaded.predict(test)
    assert np.array_equal(a["mean"], b["mean"]) and np.array_equal(a["sigma"], b["sigma"])
    # the registry entry: tags, child runs per member, metrics by S/N bin, figures
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    mv = client.get_model_version(cfg.mlflow.model_name, "1")
    assert mv.tags["features_version"] == "v000001" and len(mv.tags["config_digest"]) == 16 and "git_commit" in mv.tags
    run = client.get_run(summary["run_id"])
    assert "teff.snr_50_inf.rmse" in run.data.metrics and "teff.all.coverage68" in run.data.metrics
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert len(children) == 3
    arts = {a.path for a in client.list_artifacts(summary["run_id"], "figures")}
    assert arts == {"figures/residuals.png", "figures/calibration.png"}
    # the pyfunc flavour (logged as code, weights as safetensors) takes raw archive columns (here the
    # spectra alone) and gives the Python API's named columns
    import pandas as pd

    from stellar.api import StellarModel
    from stellar.tables import read_table

    pyf = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.model_name}@challenger")
    rvs = read_table(Path(root).parent / "tables", "rvs").sort_by("source_id").slice(0, 40)
    df = pd.DataFrame({"source_id": rvs["source_id"].to_numpy(),
                       "flux": list(np.stack(rvs["flux"].to_numpy(zero_copy_only=False)).astype(np.float64)),
                       "flux_error": list(np.stack(rvs["flux_error"].to_numpy(zero_copy_only=False)).astype(np.float64))})
    out = pyf.predict(df)
    direct = StellarModel(ens).predict_table(df)
    assert len(out) == 40 and list(out["source_id"]) == list(df["source_id"])
    for lab in ens.labels:
        assert np.allclose(out[lab], direct[lab], rtol=1e-6) and np.allclose(out[f"{lab}_err"], direct[f"{lab}_err"])
    assert (out["quality"] & 1).all() and out["ood"].all()  # no XP given: said, and flagged
    with pytest.raises(StellarError, match="has no alias 'champion'"):
        load_registered(cfg, "champion")


@pytest.mark.spark
def test_spark_members_equal_local_members(spark, features, tmp_path, rvs_instrument):
    from stellar.runtime import SparkExecutor
    from stellar.train import train_ensemble

    root, _ = features
    a = train_ensemble(_cfg(tmp_path / "a", root, "train.members=2"), rvs_instrument, log_mlflow=False)
    b = train_ensemble(_cfg(tmp_path / "b", root, "train.members=2"), rvs_instrument,
                       mapper=SparkExecutor(spark), log_mlflow=False)
    assert a["ensemble"].weights == b["ensemble"].weights


def test_spectrum_only_preset_on_second_instrument(tmp_path, hr15n_instrument):
    from stellar.train import train_ensemble

    cfg = small_config(tmp_path, n_stars=600, stars_per_file=300, instrument="ges_hr15n",
                       **{"synth.training_fraction": 0.8})
    run_survey(cfg.synth, hr15n_instrument)
    cfg = load_config(ROOT / "conf" / "local.yaml", [
        f"work_dir={tmp_path}", "instrument=ges_hr15n", "train.model=gaia_eso2023", "train.members=2",
        "train.model_overrides={max_epochs: 2}", "preprocess.label_cuts.min_snr=null"])
    ingest(cfg.ingest, hr15n_instrument, cfg.conf_dir)
    preprocess(cfg.preprocess, hr15n_instrument, cfg.ingest.output_dir)
    s = train_ensemble(cfg, hr15n_instrument, log_mlflow=False)
    ens = s["ensemble"]
    assert ens.labels[-1] == "a_li" and not ens.cfg.use_xp and not ens.cfg.use_scalars
    assert np.isfinite(s["metrics"]["a_li/all/rmse"]) and s["metrics"]["a_li/all/n"] > 5


def test_gpu_selection_from_spark_resources():
    from stellar.devices import pick_device
    from stellar.errors import StellarError

    assert pick_device("auto", ["3"], cuda_available=True, visible="").type == "cuda"
    assert str(pick_device("auto", ["3"], cuda_available=True, visible="")) == "cuda:3"
    assert str(pick_device("auto", ["3"], cuda_available=True, visible="2,3")) == "cuda:1"  # physical -> visible
    assert str(pick_device("auto", [], cuda_available=True, visible="")) == "cuda:0"
    assert str(pick_device("auto", ["0"], cuda_available=False)) == "cpu"
    assert str(pick_device("cpu", ["0"], cuda_available=True)) == "cpu"
    with pytest.raises(StellarError, match="sees no GPU"):
        pick_device("cuda", [], cuda_available=False)
    with pytest.raises(StellarError, match="auto, cuda or cpu"):
        pick_device("tpu")


def test_pretraining_learns_the_unlabelled_inputs_and_is_deterministic(features):
    """ModelConfig.pretrain_epochs (stellar.pretrain): the masked-input reconstruction loss on the unlabelled
    (observed) stars falls over the epochs, the same seed gives the same weights, and a member trained
    after it differs from one trained without it."""
    from stellar.ensemble import build_net
    from stellar.pretrain import pretrain

    root, stats = features
    labels = stats["label_names"]
    torch.manual_seed(0)
    net = build_net(ModelConfig(), stats, labels)
    losses = pretrain(net, root, stats, 4, 128, 1e-3, 0, "cpu")
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    _assert_option_is_deterministic_and_acts(root, stats, pretrain_epochs=1)
