"""Trust layer: bounded outputs under adversarial inputs, missing-input bookkeeping, thresholds, ood bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stellar.features import Q_NO_BP, Q_NO_PARALLAX, Q_NO_XP, SCALAR_NAMES
from stellar.inference_core import forward_members
from stellar.model import StackedEnsemble
from stellar.model import HybridNet, ModelConfig
from stellar.trust import (OOD_BROADENING, OOD_DISAGREEMENT, OOD_ENVELOPE, OOD_IMPRECISE, OOD_INPUT_RANGE, OOD_LABEL_DENSITY,
                           OOD_LABEL_RANGE, OOD_LINES, OOD_MAP, OOD_MISSING_INPUT, OOD_SPECTRUM, OOD_UNCERTAINTY, PHYSICAL_ENVELOPE,
                           TrustThresholds, assess, bound_outputs, drop_blocks, fit_thresholds, label_bounds,
                           missing_features)

LABELS = ["teff", "logg", "m_h", "alpha_m", "fe_h"]
NB = 55
NS = len(SCALAR_NAMES)


def fake_stats(rng=None) -> dict:
    """Normalisation statistics shaped like preprocess's, for a training set with these label ranges."""
    lab_min = np.array([3800.0, 1.0, -2.3, -0.1, -2.4])
    lab_max = np.array([6900.0, 4.8, 0.45, 0.4, 0.5])
    return {
        "label_names": LABELS, "xp_bases": NB, "n_spectrum": 800, "scalar_names": list(SCALAR_NAMES),
        "labels": {"mean": list((lab_min + lab_max) / 2), "std": list((lab_max - lab_min) / 4),
                   "min": list(lab_min), "max": list(lab_max)},
        "xp": {"mean": [0.5] * 2 * NB, "std": [0.25] * 2 * NB, "min": [0.0] * 2 * NB, "max": [1.0] * 2 * NB},
        "scalars": {"mean": [12.0, 1.0, 0.5, 1.0, 0.05, 1.0, -0.3], "std": [1.0, 0.3, 0.15, 1.0, 0.02, 0.5, 0.4],
                    "min": [8.0, 0.3, 0.2, -0.5, 0.01, -0.5, -2.0], "max": [14.2, 2.5, 1.2, 8.0, 0.15, 4.0, 0.7]},
    }


def test_bound_is_identity_inside_and_never_passes_the_margin():
    lo, hi, m_lo, m_hi = (torch.tensor(v) for v in (-1.0, 2.0, 0.5, 0.25))
    x = torch.linspace(-1e6, 1e6, 20001)
    y = bound_outputs(x, lo, hi, m_lo, m_hi)
    inside = (x >= -1) & (x <= 2)
    assert torch.equal(y[inside], x[inside])
    assert float(y.min()) >= -1.5 and float(y.max()) <= 2.25
    # continuous with slope 1 at the joins: gradients stay sane just outside the range
    xs = torch.tensor([2.0 + 1e-4, -1.0 - 1e-4], requires_grad=True)
    bound_outputs(xs, lo, hi, m_lo, m_hi).sum().backward()
    assert torch.allclose(xs.grad, torch.ones(2), atol=1e-3)
    np.testing.assert_array_equal(bound_outputs(np.array([5.0, 0.0]), -1.0, 2.0, 0.5, 0.25) <= 2.25, True)


def test_label_bounds_stay_inside_the_physical_envelope():
    stats = fake_stats()
    stats["labels"]["max"][0] = 80000.0  # a garbage training label beyond the envelope
    b = label_bounds(stats, LABELS, margin=0.25)
    mean, std = np.asarray(stats["labels"]["mean"]), np.asarray(stats["labels"]["std"])
    top = (b["hi"] + b["m_hi"]) * std + mean
    bottom = (b["lo"] - b["m_lo"]) * std + mean
    env = np.array([PHYSICAL_ENVELOPE[k] for k in LABELS])
    assert np.all(top <= env[:, 1] + 1e-6) and np.all(bottom >= env[:, 0] - 1e-6)
    assert top[1] == pytest.approx(4.8 + 0.25 * 3.8)  # log g: range 1.0-4.8 plus a quarter of it


@pytest.mark.parametrize("kind", ["zeros", "flux10", "huge_parallax", "noise"])
def test_bounded_network_never_leaves_the_envelope_for_adversarial_inputs(kind):
    stats = fake_stats()
    cfg = ModelConfig()
    bounds = label_bounds(stats, LABELS, cfg.output_margin)
    nets = []
    for i in range(3):
        torch.manual_seed(i)
        net = HybridNet(cfg, 800, 2 * NB, NS, 5, bounds=bounds).eval()
        with torch.no_grad():  # extreme weights: an untrained network that shouts
            for p in net.parameters():
                p.mul_(40.0)
        nets.append(net)
    n = 64
    g = torch.Generator().manual_seed(3)
    spectrum = {"zeros": torch.zeros(n, 800), "flux10": torch.full((n, 800), 10.0),
                "huge_parallax": torch.ones(n, 800), "noise": 1 + 50 * torch.randn(n, 800, generator=g)}[kind]
    scalars = torch.randn(n, NS, generator=g) * (1e6 if kind == "huge_parallax" else 10)
    data = {"spectrum": spectrum, "spectrum_mask": torch.zeros(n, 800, dtype=torch.bool),
            "xp": 100 * torch.randn(n, 2 * NB, generator=g), "scalars": scalars}
    for model in (nets, StackedEnsemble(nets).eval()):
        m, _ = forward_members(model, data, torch.device("cpu"), 32)
        phys = m * np.asarray(stats["labels"]["std"]) + np.asarray(stats["labels"]["mean"])
        env = np.array([PHYSICAL_ENVELOPE[k] for k in LABELS])
        assert np.isfinite(phys).all()
        assert (phys >= env[:, 0]).all() and (phys <= env[:, 1]).all(), (kind, phys.min(axis=(0, 1)))
        top = (bounds["hi"] + bounds["m_hi"]) * np.asarray(stats["labels"]["std"]) + np.asarray(stats["labels"]["mean"])
        assert (phys <= top + 1e-3 * np.abs(top)).all()


def test_stacked_ensemble_applies_the_same_bounds_as_the_members():
    stats = fake_stats()
    cfg = ModelConfig()
    bounds = label_bounds(stats, LABELS, 0.1)
    nets = []
    for i in range(3):
        torch.manual_seed(10 + i)
        net = HybridNet(cfg, 800, 2 * NB, NS, 5, bounds=bounds).eval()
        with torch.no_grad():
            net.out.weight.mul_(30.0)  # outputs that reach past the training range
        nets.append(net)
    g = torch.Generator().manual_seed(1)
    data = {"spectrum": 1 + 5 * torch.randn(100, 800, generator=g), "spectrum_mask": torch.zeros(100, 800, dtype=torch.bool),
            "xp": 30 * torch.randn(100, 2 * NB, generator=g), "scalars": 30 * torch.randn(100, NS, generator=g)}
    ref, _ = forward_members(nets, data, torch.device("cpu"), 50)
    got, _ = forward_members(StackedEnsemble(nets).eval(), data, torch.device("cpu"), 50)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert (ref > bounds["hi"]).any() or (ref < bounds["lo"]).any()  # the inputs did reach the margins


def test_missing_features_follow_the_quality_bits():
    q = np.array([0, Q_NO_XP, Q_NO_BP, Q_NO_PARALLAX])
    xp_missing, sc_missing, blocks = missing_features(q, NB)
    assert not xp_missing[0].any() and xp_missing[1].all()
    assert xp_missing[2, :NB].all() and not xp_missing[2, NB:].any()
    plx = [SCALAR_NAMES.index(k) for k in ("parallax", "parallax_error", "reduced_parallax",
                                            "log_reduced_parallax")]
    assert sc_missing[3, plx].all() and sc_missing[3].sum() == 4
    assert blocks.tolist() == [[False] * 5, [True, True, True, False, False], [False, True, False, False, False],
                               [False, False, False, True, False]]


def test_block_dropout_blanks_features_as_preprocess_does():
    stats = fake_stats()
    xp = torch.randn(2000, 2 * NB)
    sc = torch.randn(2000, NS)
    before_xp, before_sc = xp.clone(), sc.clone()
    gen = torch.Generator().manual_seed(0)
    drop_blocks(xp, sc, {"bp": 0.1, "parallax": 0.05}, stats, gen)
    fill_xp = -0.5 / 0.25
    bp_hit = (xp[:, :NB] == fill_xp).all(dim=1)
    assert 0.07 < float(bp_hit.float().mean()) < 0.13
    assert torch.equal(xp[:, NB:], before_xp[:, NB:])  # RP untouched
    plx = [SCALAR_NAMES.index(k) for k in ("parallax", "parallax_error", "reduced_parallax",
                                            "log_reduced_parallax")]
    changed = (sc != before_sc).any(dim=1)
    assert 0.03 < float(changed.float().mean()) < 0.07
    assert torch.equal(sc[:, [0, 1, 2]], before_sc[:, [0, 1, 2]])
    fill = -np.asarray(stats["scalars"]["mean"])[plx] / np.asarray(stats["scalars"]["std"])[plx]
    np.testing.assert_allclose(sc[changed][:, plx].numpy(), np.broadcast_to(fill, (int(changed.sum()), 4)), rtol=1e-6)
    # reproducible: the same generator state, the same stars
    xp2, sc2 = before_xp.clone(), before_sc.clone()
    drop_blocks(xp2, sc2, {"bp": 0.1, "parallax": 0.05}, stats, torch.Generator().manual_seed(0))
    assert torch.equal(xp2, xp) and torch.equal(sc2, sc)


def _normalised_inputs(stats, n, rng):
    xp_raw = rng.uniform(0.02, 0.98, (n, 2 * NB))
    sc_raw = np.column_stack([rng.uniform(lo, hi, n) for lo, hi in zip(stats["scalars"]["min"], stats["scalars"]["max"])])
    sc_raw = 0.5 * (sc_raw + np.asarray(stats["scalars"]["mean"]))  # well inside
    xp = (xp_raw - 0.5) / 0.25
    sc = (sc_raw - np.asarray(stats["scalars"]["mean"])) / np.asarray(stats["scalars"]["std"])
    return xp, sc


def test_thresholds_flag_the_chosen_share_of_validation_stars_and_catch_outliers():
    rng = np.random.default_rng(0)
    stats = fake_stats()
    n = 4000
    xp, sc = _normalised_inputs(stats, n, rng)
    xp[:200, 5] += rng.exponential(0.3, 200)  # some validation stars a little beyond the training range
    epistemic = rng.lognormal(-2, 0.3, (n, 5))
    mean = np.tile([5000.0, 3.0, -0.2, 0.1, -0.2], (n, 1))
    snr = rng.uniform(15, 300, n)
    # grows with S/N, as a real emulator's, and so does its spread
    chi2 = np.exp(0.3 * np.log(snr / 30) + rng.normal(0, 0.08 * (snr / 30) ** 0.5, n))
    line = np.exp(rng.normal(0, 0.2, n))
    # the broadening significance: centred above 0 and wider at high S/N (emulator mismatch), signed
    broad = 0.5 + rng.normal(0, 1.0, n) * (snr / 30) ** 0.4
    score = rng.uniform(0.3, 2.0, n)
    # the network's own uncertainty falls with S/N (sigma ~ 1/S/N^0.7), with a log-normal spread
    sigma = 0.3 * (snr[:, None] / 30) ** -0.7 * np.exp(rng.normal(0, 0.15, (n, 5)))
    thr = fit_thresholds(stats, LABELS, xp, sc, np.zeros(n, int), mean, epistemic, rate=0.03,
                         trained_missing=["bp"], spectrum_chi2=chi2, line_chi2=line, snr=snr, map_score=score,
                         sigma_norm=sigma, line_broadening=broad)
    assert TrustThresholds.from_dict(thr.to_dict()) == thr
    assert abs(thr.spectrum_trend[1] - 0.3) < 0.05 and abs(thr.spectrum_trend[2]) < 0.05  # the S/N trend is out
    reason, withheld = assess(stats, thr, LABELS, xp, sc, np.zeros(n, int), mean, epistemic, np.ones(n),
                              spectrum_chi2=chi2, line_chi2=line, snr=snr, map_score=score, sigma_norm=sigma,
                              line_broadening=broad)
    assert not withheld.any()
    assert 0.02 <= (reason != 0).mean() <= 0.03  # all tests together flag the chosen share
    assert abs(thr.sigma_trend[0][1] + 0.7) < 0.1  # the uncertainty's S/N trend is out
    for bit in (OOD_INPUT_RANGE, OOD_DISAGREEMENT, OOD_SPECTRUM, OOD_LINES, OOD_MAP, OOD_UNCERTAINTY,
                OOD_BROADENING):
        assert 0.002 <= ((reason & bit) != 0).mean() <= thr.per_test_rate + 1e-3
    wide = (reason & OOD_BROADENING) != 0
    assert abs(wide[snr < 60].mean() - wide[snr > 150].mean()) < 0.01  # its S/N trend is out too
    # a star with lines broader than its S/N allows is flagged, one as much narrower (negative) is not
    r_b, _ = assess(stats, thr, LABELS, xp[:2], sc[:2], np.zeros(2, int), mean[:2], np.full((2, 5), 0.1), None,
                    snr=np.array([30.0, 30.0]), line_broadening=np.array([8.0, -8.0]))
    assert r_b[0] & OOD_BROADENING and not r_b[1] & OOD_BROADENING
    # a model fitted before the test (no trend in its JSON) keeps it off
    old_model = {k: v for k, v in thr.to_dict().items() if k not in ("broadening_trend", "line_broadening")}
    r_o, _ = assess(stats, TrustThresholds.from_dict(old_model), LABELS, xp[:1], sc[:1], np.zeros(1, int), mean[:1],
                    np.full((1, 5), 0.1), None, snr=np.array([30.0]), line_broadening=np.array([50.0]))
    assert not r_o[0] & OOD_BROADENING
    # each chi-square test flags alike at low and high S/N: the trend is out
    spec = (reason & OOD_SPECTRUM) != 0
    assert abs(spec[snr < 60].mean() - spec[snr > 150].mean()) < 0.01
    unc = (reason & OOD_UNCERTAINTY) != 0
    assert abs(unc[snr < 60].mean() - unc[snr > 150].mean()) < 0.01  # alike at every S/N
    # a star as unsure at S/N 200 as a typical star at S/N 15 is flagged; that star at S/N 15 is not
    typical_15 = 0.3 * (15 / 30) ** -0.7
    probe = np.full((2, 5), 0.3 * (200 / 30) ** -0.7)
    probe[0, 2] = typical_15
    probe_snr = np.array([200.0, 200.0])
    r_unc, _ = assess(stats, thr, LABELS, xp[:2], sc[:2], np.zeros(2, int), mean[:2], np.full((2, 5), 0.1), None,
                      snr=probe_snr, sigma_norm=probe)
    assert r_unc[0] & OOD_UNCERTAINTY and not r_unc[1] & OOD_UNCERTAINTY
    r_low, _ = assess(stats, thr, LABELS, xp[:1], sc[:1], np.zeros(1, int), mean[:1], np.full((1, 5), 0.1), None,
                      snr=np.array([15.0]), sigma_norm=np.full((1, 5), typical_15))
    assert not r_low[0] & OOD_UNCERTAINTY
    # out-of-distribution stars: each test catches its own kind
    m = 6
    xo, so = _normalised_inputs(stats, m, rng)
    so[0, 1] = (3.5 - 1.0) / 0.3  # BP-RP 3.5: redder than any training star
    eo = np.full((m, 5), 0.1)
    eo[1, 0] = 5.0  # members disagree on Teff
    mo = np.tile([5000.0, 3.0, -0.2, 0.1, -0.2], (m, 1))
    mo[2, 2] = -3.5  # [M/H] below the training range
    mo[3, 0] = -140000.0  # impossible: withheld
    qo = np.zeros(m, int)
    qo[4] = Q_NO_PARALLAX  # the model was not trained without a parallax
    qo[5] = Q_NO_BP  # ... but was without BP
    tl = np.array([1, 1, 1, 1, 1, 0], dtype=float)
    r, w = assess(stats, thr, LABELS, xo, so, qo, mo, eo, tl)
    assert r[0] & OOD_INPUT_RANGE and r[1] & OOD_DISAGREEMENT and r[2] & OOD_LABEL_RANGE
    assert r[3] & OOD_ENVELOPE and w[3].tolist() == [True, False, False, False, False]
    assert r[4] & OOD_MISSING_INPUT and not r[5] & OOD_MISSING_INPUT and r[5] & OOD_MAP  # no score: train_like
    # with scores, the map test is the calibrated score threshold, not the selection's train_like
    so_score = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    r3, _ = assess(stats, thr, LABELS, xo, so, qo, mo, eo, 1.0 - tl, map_score=so_score)
    assert (r3 & OOD_MAP != 0).tolist() == [False] * 5 + [True]
    # a model without thresholds still runs the threshold-free tests
    r2, _ = assess(stats, None, LABELS, xo, so, qo, mo, eo, None)
    assert r2[2] & OOD_LABEL_RANGE and r2[4] & OOD_MISSING_INPUT and not r2[0] & OOD_INPUT_RANGE
    # the precision test: a label whose published (calibrated) uncertainty is above its limit, and only
    # where the caller passes the published uncertainties (at train time, before calibration, it does not)
    thr.precision_limit = {"teff": 500.0, "m_h": 0.25}
    assert TrustThresholds.from_dict(thr.to_dict()).precision_limit == thr.precision_limit
    published = np.tile([100.0, 0.9, 0.05, 0.9, 0.9], (3, 1))  # logg, alpha_m, fe_h: no limit set
    published[1, 0], published[2, 2] = 501.0, 0.26
    r4, _ = assess(stats, thr, LABELS, xp[:3], sc[:3], np.zeros(3, int), mean[:3], np.full((3, 5), 0.1), None,
                   snr=snr[:3], sigma_norm=sigma[:3], sigma=published)
    assert ((r4 & OOD_IMPRECISE) != 0).tolist() == [False, True, True]
    r5, _ = assess(stats, thr, LABELS, xp[:3], sc[:3], np.zeros(3, int), mean[:3], np.full((3, 5), 0.1), None,
                   snr=snr[:3], sigma_norm=sigma[:3])
    assert not (r5 & OOD_IMPRECISE).any()


def _population(n: int, rng) -> np.ndarray:
    """Physical labels of a Galactic-like population: alpha-rich only when metal-poor, dwarfs only when warm."""
    m_h = rng.uniform(-1.5, 0.4, n)
    alpha = np.where(m_h < -0.5, 0.3, 0.02) + rng.normal(0, 0.03, n)
    giant = rng.random(n) < 0.6
    teff = np.where(giant, rng.uniform(4000, 5100, n), rng.uniform(5000, 6600, n))
    logg = np.where(giant, 1.0 + (teff - 4000) / 550, 4.0 + (teff - 5000) / -4000 + rng.normal(0, 0.1, n))
    return np.stack([teff, logg, m_h, alpha, m_h + 0.8 * alpha], axis=1)


def test_label_density_flags_label_combinations_the_training_set_never_held():
    rng = np.random.default_rng(3)
    stats = fake_stats()
    mu, sd = np.asarray(stats["labels"]["mean"]), np.asarray(stats["labels"]["std"])
    reference = (_population(4000, rng) - mu) / sd
    n = 2000
    mean = _population(n, rng) + rng.normal(0, 1, (n, 5)) * [60, 0.08, 0.04, 0.03, 0.04]  # predicted: noisy
    xp, sc = _normalised_inputs(stats, n, rng)
    epistemic = rng.lognormal(-2, 0.3, (n, 5))
    thr = fit_thresholds(stats, LABELS, xp, sc, np.zeros(n, int), mean, epistemic, rate=0.03,
                         label_reference=reference)
    assert np.isfinite(thr.label_density) and thr.label_reference.shape == (4000, 5)
    reason, _ = assess(stats, thr, LABELS, xp, sc, np.zeros(n, int), mean, epistemic, None)
    assert 0.002 <= ((reason & OOD_LABEL_DENSITY) != 0).mean() <= thr.per_test_rate + 1e-3
    # each label in range, the combination never seen: alpha-rich at [M/H] +0.3; a 6,300 K star with a
    # giant's log g; and two ordinary stars
    probe = np.array([[5800.0, 4.2, 0.3, 0.30, 0.45], [6300.0, 2.0, -0.2, 0.02, -0.18],
                      [4500.0, 1.9, -0.2, 0.02, -0.18], [5600.0, 4.1, -1.0, 0.30, -0.76]])
    assert (probe >= np.asarray(stats["labels"]["min"])).all() and (probe <= np.asarray(stats["labels"]["max"])).all()
    r, _ = assess(stats, thr, LABELS, xp[:4], sc[:4], np.zeros(4, int), probe, np.full((4, 5), 0.1), None)
    assert ((r & OOD_LABEL_DENSITY) != 0).tolist() == [True, True, False, False]
    assert not (r & OOD_LABEL_RANGE).any()
    # the reference travels as its own safetensors file; without it (an older model) the test is off
    back = TrustThresholds.from_dict(thr.to_dict())
    back.attach_reference(thr.reference_files())
    assert back.label_density == thr.label_density
    np.testing.assert_allclose(back.label_reference, thr.label_reference, rtol=1e-6, atol=1e-6)
    r_back, _ = assess(stats, back, LABELS, xp[:4], sc[:4], np.zeros(4, int), probe, np.full((4, 5), 0.1), None)
    assert (r_back == r).all()
    # a label most reference stars lack (a survey's lithium) is left out of the distance, not the stars
    with_li = np.c_[reference, np.where(rng.random(len(reference)) < 0.8, np.nan, 0.0)]
    stats6 = {**stats, "label_names": LABELS + ["a_li"],
              "labels": {k: list(v) + [1.0] for k, v in stats["labels"].items()}}
    thr6 = fit_thresholds(stats6, LABELS + ["a_li"], xp, sc, np.zeros(n, int), np.c_[mean, np.ones(n)],
                          np.c_[epistemic, epistemic[:, :1]],
                          rate=0.03, label_reference=with_li)
    assert thr6.label_columns == LABELS and thr6.label_reference.shape == (4000, 5)
    r6, _ = assess(stats6, thr6, LABELS + ["a_li"], xp[:4], sc[:4], np.zeros(4, int), np.c_[probe, np.ones(4)],
                   np.full((4, 6), 0.1), None)
    assert ((r6 & OOD_LABEL_DENSITY) != 0).tolist() == [True, True, False, False]
    old = TrustThresholds.from_dict(thr.to_dict())
    old.attach_reference({})
    r_old, _ = assess(stats, old, LABELS, xp[:4], sc[:4], np.zeros(4, int), probe, np.full((4, 5), 0.1), None)
    assert not (r_old & OOD_LABEL_DENSITY).any()


def test_precision_limits_follow_the_held_out_stars_error_tails():
    """A catastrophic error over the held-out |z| quantile at the accepted odds: Gaussian errors give
    the Gaussian quantile, heavy-tailed ones a larger quantile and so tighter limits, and a lucky
    split with thin tails never makes them laxer than a Gaussian's."""
    from scipy.stats import norm

    from stellar.trust import fit_precision_limits

    rng = np.random.default_rng(3)
    n = 200_000
    labels = ["teff", "logg", "alpha_m"]
    sigma = np.tile([100.0, 0.2, 0.05], (n, 1))
    cat = {"teff": 1000.0, "logg": 1.0}  # alpha_m: no limit
    gauss = rng.standard_normal((n, 3)) * sigma
    lim, q = fit_precision_limits(gauss, sigma, np.zeros((n, 3)), labels, cat, 0.01)
    assert q == pytest.approx(norm.isf(0.005), rel=0.02) and set(lim) == {"teff", "logg"}
    assert lim["teff"] == pytest.approx(1000.0 / q) and lim["logg"] == pytest.approx(1.0 / q)
    heavy = rng.standard_t(3, (n, 3)) / np.sqrt(3.0) * sigma  # unit variance, heavy tails
    _, q_heavy = fit_precision_limits(heavy, sigma, np.zeros((n, 3)), labels, cat, 0.01)
    assert q_heavy > 1.05 * q
    # label errors count in the z-score, as in the calibration; missing labels are skipped
    err = np.tile([100.0, 0.2, 0.05], (n, 1))
    resid = gauss * np.sqrt(2.0)
    resid[:1000, 0] = np.nan
    _, q_err = fit_precision_limits(resid, sigma, err, labels, cat, 0.01)
    assert q_err == pytest.approx(q, rel=0.03)
    thin = rng.uniform(-1.0, 1.0, (n, 3)) * sigma  # |z| never above 1
    _, q_thin = fit_precision_limits(thin, sigma, np.zeros((n, 3)), labels, cat, 0.01)
    assert q_thin == pytest.approx(norm.isf(0.005))


def test_emulator_recovers_a_quadratic_model_and_reacts_to_doubled_lines():
    """The quadratic emulator fits, its chi-squares are ~1 on stars like the training ones, line_chi2 sees a
    binary 60 km/s apart, and line_broadening (a matched filter, ~N(0, 1) on single stars) sees one only
    15 km/s apart, where the lines merge into one wider line, and grows with the separation; lines only weaker
    than emulated leave it at zero."""
    from stellar.emulator import SpectrumEmulator, design, line_window

    rng = np.random.default_rng(5)
    wave = np.linspace(846.0, 870.0, 800)
    depth = lambda centre, w: np.exp(-0.5 * ((wave - centre) / w) ** 2)  # noqa: E731
    lines = depth(854.4, 0.08) + 0.8 * depth(866.45, 0.08) + 0.3 * depth(850.0, 0.06)
    n, L = 3000, 3
    z = rng.normal(size=(n, L))

    def spectra(z, shift=0.0):
        strength = 0.5 + 0.1 * z[:, :1] + 0.03 * z[:, 1:2] ** 2
        base = 1 - strength * lines[None, :]
        if shift:
            moved = np.interp(wave - shift, wave, lines)
            base = 1 - strength * 0.5 * (lines[None, :] + moved[None, :])
        return base + 0.002 * z[:, 2:3]

    err = np.full((n, wave.size), 0.01)
    flux = spectra(z) + err * rng.normal(size=err.shape)
    window = line_window(wave, [(854.443, 0.93), (866.451, 0.63), (850.035, 0.12), (869.1, -1.35)])
    assert window.sum() > 100 and not window[np.abs(wave - 860) < 3].any()
    emu = SpectrumEmulator.fit(z, flux, err, np.zeros_like(flux, dtype=np.uint8), window)
    assert emu.theta.shape == (design(z[:1]).shape[1], wave.size)
    assert float(np.abs(emu.model(z[:50]) - spectra(z[:50])).max()) < 0.005
    assert float(emu.scatter.max()) < 0.005  # nothing the quadratic misses
    zt = rng.normal(size=(200, L))
    chi2, line, broad = emu.statistics(zt, spectra(zt) + 0.01 * rng.normal(size=(200, wave.size)), err[:200],
                                       np.zeros((200, wave.size), np.uint8))
    assert 0.9 < np.median(chi2) < 1.1 and 0.85 < np.median(line) < 1.15
    assert abs(np.median(broad)) < 0.3 and 0.8 < np.std(broad) < 1.25  # a significance: N(0, 1) on single stars
    # a double-lined binary: the same star with half the light shifted by 60 km/s (0.17 nm)
    chi2_b, line_b, broad_b = emu.statistics(zt, spectra(zt, shift=0.17) + 0.01 * rng.normal(size=(200, wave.size)),
                                             err[:200], np.zeros((200, wave.size), np.uint8))
    assert np.median(line_b) > 5 * np.median(line) and np.median(line_b) > np.median(chi2_b)
    assert np.median(broad_b) > 5
    # 15 km/s (0.043 nm, under the lines' 0.19 nm FWHM): one wider line, flagged at the single stars' own
    # 99th percentile; closer pairs read lower, but above the single stars' median
    noise = lambda: 0.01 * rng.normal(size=(200, wave.size))  # noqa: E731
    masked = np.zeros((200, wave.size), np.uint8)
    masked[:, 300:340] = 1  # masked pixels change nothing but the count
    _, line_c, broad_c = emu.statistics(zt, spectra(zt, shift=0.043) + noise(), err[:200], masked)
    assert np.mean(broad_c > np.quantile(broad, 0.99)) > 0.9
    medians = [np.median(emu.statistics(zt, spectra(zt, shift=d) + noise(), err[:200], masked)[2])
               for d in (0.01, 0.02, 0.03)]
    assert np.median(broad) < medians[0] < medians[1] < medians[2] < np.median(broad_c)
    # lines only weaker than emulated (a metal-poorer star at the same labels): line_chi2 sees it, the
    # broadening filter (orthogonal to the absorption) does not
    weak = 1 - 0.7 * (1 - spectra(zt)) + noise()
    _, line_w, broad_w = emu.statistics(zt, weak, err[:200], masked)
    assert np.median(line_w) > 5 and abs(np.median(broad_w)) < 1
    _, _, none = emu.statistics(zt[:1], spectra(zt[:1]), err[:1], np.ones((1, wave.size), np.uint8))
    assert np.isnan(none[0])
    from safetensors.numpy import load, save

    emu.theta = np.asfortranarray(emu.theta)  # a transposed layout must survive the bytes too
    round_trip = SpectrumEmulator.from_tensors(load(save(emu.to_tensors())))
    np.testing.assert_array_equal(round_trip.theta, emu.theta)
    assert np.array_equal(round_trip.window, emu.window)


def test_uncertainty_calibration_follows_the_kind_of_star():
    """Raw sigmas 2x too large for 'dwarfs' (u ~ 1) and right for 'giants': fitted on a 25 % dwarf
    sample, the factor is right for each kind, so it holds on a 60 % dwarf catalogue; with no such
    effect the label terms stay near zero (the prior)."""
    from stellar.ensemble import fit_label_calibration, label_terms

    def sample(n, dwarf_share, effect, rng):
        dwarf = rng.random(n) < dwarf_share
        u = np.where(dwarf, rng.normal(1.0, 0.2, n), rng.normal(-0.5, 0.3, n))[:, None]
        u = label_terms(u, np.array([[-1.5, 1.5]]))
        t = rng.uniform(-0.7, 1.9, n)
        s = rng.uniform(0.05, 0.1, n)
        e = np.full(n, 0.01)
        true = np.where(dwarf, 1.0 / effect, 1.0)
        r = rng.normal(0, np.sqrt((true * s) ** 2 + e**2))
        return dwarf, u, t, s, e, r

    rng = np.random.default_rng(5)
    dwarf, u, t, s, e, r = sample(500, 0.25, 2.0, rng)
    a, b, q, g, h = fit_label_calibration(r, s, e, t, u)
    assert not np.any(h)  # no floor: no floor terms
    dwarf2, u2, t2, s2, e2, r2 = sample(4000, 0.6, 2.0, rng)
    c = np.exp(a + b * t2 + q * t2**2 + np.clip(u2 @ g, -np.log(2), np.log(2)))
    z = r2 / np.sqrt((c * s2) ** 2 + e2**2)
    for kind in (dwarf2, ~dwarf2):
        assert 0.85 <= z[kind].std() <= 1.15, z[kind].std()
    assert 0.9 <= z.std() <= 1.1
    # the S/N-only factor leaves the dwarfs' errors far too large
    from stellar.ensemble import fit_snr_calibration

    a1, b1 = fit_snr_calibration(r, s, e, t)
    z1 = r2 / np.sqrt((np.exp(a1 + b1 * t2) * s2) ** 2 + e2**2)
    assert z1[dwarf2].std() < 0.75, z1[dwarf2].std()
    _, u, t, s, e, r = sample(500, 0.25, 1.0, rng)
    _, _, q0, g0, _ = fit_label_calibration(r, s, e, t, u)
    assert abs(q0) < 0.05, q0  # no curvature in the data: the prior keeps it near zero
    assert np.all(np.abs(g0) < 0.15), g0


def test_weighted_calibration_equals_repeating_the_stars():
    """A star of weight 2 in the calibration fit counts as that star twice (the copies of the faint end
    weigh 1 / copies each), and the weighted factor makes the weighted z-scores' mean square 1."""
    from stellar.ensemble import fit_label_calibration, label_terms

    rng = np.random.default_rng(8)
    n = 400
    u = label_terms(rng.normal(0, 0.5, (n, 1)), np.array([[-1.5, 1.5]]))
    t = rng.uniform(-0.7, 1.9, n)
    s = rng.uniform(0.05, 0.1, n)
    e = np.full(n, 0.01)
    r = rng.normal(0, np.sqrt((0.8 * s * np.exp(0.1 * t)) ** 2 + e**2))
    w = np.where(rng.random(n) < 0.3, 2.0, 1.0)
    rep = np.repeat(np.arange(n), w.astype(int))
    a, b, q, g, _ = fit_label_calibration(r, s, e, t, u, w=w)
    a2, b2, q2, g2, _ = fit_label_calibration(r[rep], s[rep], e[rep], t[rep], u[rep])
    assert np.allclose([a, b, q, *g], [a2, b2, q2, *g2], atol=2e-3)
    c = np.exp(a + b * t + q * t**2 + np.clip(u @ g, -np.log(2), np.log(2)))
    assert np.sum(w * r**2 / ((c * s) ** 2 + e**2)) / w.sum() == pytest.approx(1.0, abs=1e-6)


def test_calibration_floor_lifts_the_smallest_sigmas_and_stays_off_where_errors_follow_sigma():
    """Errors that stop shrinking with sigma get a floor in quadrature; errors that follow sigma get none."""
    from stellar.ensemble import fit_calibration_with_floor, fit_label_calibration

    rng = np.random.default_rng(11)

    def sample(n, floor):
        snr = np.exp(rng.uniform(np.log(15), np.log(300), n))
        s = 0.05 * (snr / 30) ** -0.8 * np.exp(rng.normal(0, 0.4, n))  # sigma varies at a given S/N too
        e = np.full(n, 0.01)
        r = rng.normal(0, np.sqrt((1.3 * s) ** 2 + floor**2 + e**2))
        return np.clip(np.log(snr / 30), np.log(0.5), np.log(10)), s, e, r

    none = np.zeros((3000, 0))
    t, s, e, r = sample(3000, 0.03)
    a, b, q, g, f, _ = fit_calibration_with_floor(r, s, e, t, none)
    assert 0.018 <= f <= 0.045, f
    a0, b0, q0, *_ = fit_label_calibration(r, s, e, t, none)
    t2, s2, e2, r2 = sample(6000, 0.03)
    smallest = s2 < np.quantile(s2, 0.2)
    z = r2 / np.sqrt((np.exp(a + b * t2 + q * t2**2) * s2) ** 2 + f * f + e2**2)
    assert 0.9 <= z[smallest].std() <= 1.1 and 0.9 <= z[~smallest].std() <= 1.1, (z[smallest].std(), z.std())
    # without the floor the S/N factor cannot lift the smallest sigmas: their errors are too small
    z0 = r2 / np.sqrt((np.exp(a0 + b0 * t2 + q0 * t2**2) * s2) ** 2 + e2**2)
    assert z0[smallest].std() > 1.12, z0[smallest].std()
    t, s, e, r = sample(3000, 0.0)
    *_, f0, _ = fit_calibration_with_floor(r, s, e, t, none)
    assert f0 <= 0.2 * np.median(s), (f0, np.median(s))


def test_calibration_floor_follows_the_kind_of_star():
    """A floor that giants have and dwarfs have much less of (the network's systematic error is a kind of star's,
    not the survey's), fitted on a 25 % dwarf sample with label noise:
    the floor's own kind terms keep the giants' floor off the dwarfs, so both kinds' z-scores come out
    right on a 60 % dwarf catalogue, where one floor for all leaves the dwarfs' errors too large."""
    from stellar.ensemble import calibration_nll, fit_calibration_with_floor, floor_scale, label_terms

    def sample(n, dwarf_share, rng):
        dwarf = rng.random(n) < dwarf_share
        u = label_terms(np.where(dwarf, rng.normal(1.0, 0.2, n), rng.normal(-0.5, 0.3, n))[:, None],
                        np.array([[-1.5, 1.5]]))
        snr = np.exp(rng.uniform(np.log(15), np.log(300), n))
        t = np.clip(np.log(snr / 30), np.log(0.5), np.log(10))
        s = 0.05 * (snr / 30) ** -0.8 * np.where(dwarf, 0.6, 1.0)
        e = np.full(n, 0.01)
        floor = np.where(dwarf, 0.015, 0.04)
        r = rng.normal(0, np.sqrt(s**2 + floor**2 + e**2))
        return dwarf, u, t, s, e, r, floor

    rng = np.random.default_rng(17)
    dwarf, u, t, s, e, r, _ = sample(1200, 0.25, rng)
    a, b, q, g, f, h = fit_calibration_with_floor(r, s, e, t, u)
    assert f > 0 and h[1] < -0.3, (f, h)  # the floor shrinks toward the dwarfs' end (u^2 grows there)
    dwarf2, u2, t2, s2, _, _, floor2 = sample(20000, 0.6, rng)
    true2 = rng.normal(0, np.sqrt(s2**2 + floor2**2))  # against the truth: no label noise
    sig = np.sqrt((np.exp(a + b * t2 + q * t2**2 + np.clip(u2 @ g, -np.log(2), np.log(2))) * s2) ** 2
                  + (f * floor_scale(u2, h)) ** 2)
    z = true2 / sig
    high = t2 > np.log(50 / 30)
    for kind in (dwarf2 & high, ~dwarf2 & high):
        assert 0.85 <= z[kind].std() <= 1.15, z[kind].std()
    # with one floor for all (h = 0) the dwarfs' errors at high S/N come out too large, and the
    # likelihood of the fit stars is lower
    sig0 = np.sqrt((np.exp(a + b * t2 + q * t2**2 + np.clip(u2 @ g, -np.log(2), np.log(2))) * s2) ** 2 + f**2)
    assert (true2 / sig0)[dwarf2 & high].std() < 0.8, (true2 / sig0)[dwarf2 & high].std()
    assert calibration_nll(r, s, e, t, u, (a, b, q, g, h), floor=f) < calibration_nll(r, s, e, t, u, (a, b, q, g), floor=f)


def test_uncertainty_calibration_follows_snr_smoothly():
    """Raw sigmas 1.5x too large at S/N 200 and right at S/N 15: the fitted factor follows, with
    no step and no extrapolation beyond the S/N the fit saw."""
    from stellar.ensemble import fit_snr_calibration

    rng = np.random.default_rng(3)
    n = 600
    snr = np.exp(rng.uniform(np.log(15), np.log(200), n))
    t = np.log(snr / 30.0)
    true_factor = np.exp(-0.21 * np.log(snr / 15.0))  # 1.0 at 15 -> 0.58 at 200
    s = rng.uniform(0.05, 0.1, n)
    e = np.full(n, 0.01)
    r = rng.normal(0, np.sqrt((true_factor * s) ** 2 + e**2))
    a, b = fit_snr_calibration(r, s, e, t)
    fitted = np.exp(a + b * t)
    assert abs(b + 0.21) < 0.08
    for lo, hi in ((15, 25), (25, 50), (50, 200)):
        sel = (snr >= lo) & (snr < hi)
        z = r[sel] / np.sqrt((fitted[sel] * s[sel]) ** 2 + e[sel] ** 2)
        assert 0.88 <= z.std() <= 1.12, (lo, hi, z.std())


def test_uncertainty_calibration_bends_where_a_straight_line_in_log_snr_cannot():
    """Raw sigmas right at S/N 15 and 200 but 1.35x too large at S/N ~40 (the pattern measured on both
    surveys: every label's spread lowest at S/N 25-50): the curvature term puts every S/N bin within
    0.93-1.07, where the straight line, a compromise, misses at least one bin by more than 0.08
    (measured: 1.12 at S/N 15-25); held-out stars measure it."""
    from stellar.ensemble import fit_label_calibration, fit_snr_calibration

    def sample(n, rng):
        snr = np.exp(rng.uniform(np.log(15), np.log(200), n))
        t = np.log(snr / 30.0)
        x = np.log(snr / 15.0) / np.log(200 / 15.0)  # 0 at S/N 15, 1 at 200
        true = np.exp(-4 * np.log(1.35) * x * (1 - x))  # 1 at both ends, 1/1.35 in the middle
        s = rng.uniform(0.05, 0.1, n)
        e = np.full(n, 0.01)
        return snr, t, s, e, rng.normal(0, np.sqrt((true * s) ** 2 + e**2))

    rng = np.random.default_rng(11)
    snr, t, s, e, r = sample(1500, rng)
    a, b, q, *_ = fit_label_calibration(r, s, e, t, np.zeros((len(r), 0)))
    a1, b1 = fit_snr_calibration(r, s, e, t)
    assert q > 0.03, q
    snr2, t2, s2, e2, r2 = sample(20000, rng)
    spread, spread1 = [], []
    for lo, hi in ((15, 25), (25, 50), (50, 200)):
        sel = (snr2 >= lo) & (snr2 < hi)
        for c, out in ((np.exp(a + b * t2 + q * t2**2), spread), (np.exp(a1 + b1 * t2), spread1)):
            out.append(float((r2[sel] / np.sqrt((c[sel] * s2[sel]) ** 2 + e2[sel] ** 2)).std()))
    assert all(0.93 <= v <= 1.07 for v in spread), spread
    assert min(spread1) < 0.92 or max(spread1) > 1.08, spread1


def test_mean_correction_removes_an_edge_bias_and_leaves_an_unbiased_label_alone():
    """Predictions pulled toward the middle at one edge (dwarfs' log g 0.05 low, the measured pattern) and
    validation labels with unbiased noise larger than the scatter: the fitted correction takes held-out
    stars' bias at that edge (u > 1.7) from -0.035 to within 0.015 (a quadratic, not the true shape) and
    their RMSE down by 20 % or more; on an unbiased label the 2-fold cross-validation keeps it (almost)
    off, so held-out residuals do not grow."""
    from stellar.ensemble import fit_mean_correction, mean_terms

    def sample(n, rng, biased):
        u = rng.uniform(-2, 2, (n, 1))  # predicted normalised label
        truth = u[:, 0] + rng.normal(0, 0.03, n)
        if biased:  # the upper edge reads low: -0.05 at u = 2, nothing below u = 1
            truth = truth + 0.05 * np.clip(u[:, 0] - 1, 0, None) ** 2
        labels = truth + rng.normal(0, 0.05, n)  # catalogue noise, unbiased
        return u, truth, labels

    rng = np.random.default_rng(5)
    rangeu = np.array([[-2.0, 2.0]])
    for biased in (True, False):
        u, _, y = sample(450, rng, biased)
        X = mean_terms(u, rangeu)
        w = np.full(len(u), 1.0 / (0.03**2 + 0.05**2))
        fold = rng.random(len(u)) < 0.5
        beta = fit_mean_correction(y - u[:, 0], w, X, fold)
        u2, truth2, _ = sample(20000, rng, biased)
        shifted = u2[:, 0] + mean_terms(u2, rangeu) @ beta
        edge = u2[:, 0] > 1.7
        before = np.sqrt(np.mean((u2[:, 0] - truth2) ** 2))
        after = np.sqrt(np.mean((shifted - truth2) ** 2))
        if biased:
            assert np.mean(u2[edge, 0] - truth2[edge]) < -0.03  # the bias is there (-0.035 above u = 1.7)
            assert abs(np.mean(shifted[edge] - truth2[edge])) < 0.015, beta
            edge_before = np.sqrt(np.mean((u2[edge, 0] - truth2[edge]) ** 2))
            edge_after = np.sqrt(np.mean((shifted[edge] - truth2[edge]) ** 2))
            assert edge_after < 0.8 * edge_before and after < before, (edge_after, edge_before, after, before)
        else:
            assert np.abs(beta).max() < 0.01, beta
            assert after < 1.02 * before, (after, before)
