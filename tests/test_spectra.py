"""The line model behaves as designed (values, not just shapes)."""

import numpy as np
import pytest

from stellar.instruments import Instrument
from stellar.synth.spectra import SpectrumModel, equivalent_width, pseudo_voigt

CAT = (850.035, 854.444, 866.452)


def params(n, **kw):
    base = {"teff": 5000.0, "logg": 2.5, "m_h": 0.0, "alpha_m": 0.0, "a_li": 1.0, "vbroad": 4.0, "a_v": 0.0}
    base.update(kw)
    out = {k: np.broadcast_to(np.asarray(v, dtype=float), (n,)).copy() for k, v in base.items()}
    out["fe_h"] = out["m_h"].copy()
    return out


def cat_ew(model, p):
    flux = model.spectra(p)
    return sum(equivalent_width(model.instrument.wave, flux, c, 1.2) for c in CAT)


def test_pseudo_voigt_is_area_normalised():
    x = np.linspace(-40, 40, 400001)[None, :]
    for fg, fl in [(0.02, 0.0), (0.02, 0.01), (0.01, 0.2)]:
        area = pseudo_voigt(x, np.array([[fg]]), np.array([[fl]])).sum() * (x[0, 1] - x[0, 0])
        assert area == pytest.approx(1.0, abs=0.01 if fl < 0.1 else 0.02)


def test_ca_triplet_grows_with_metallicity_and_gravity(rvs_instrument):
    model = SpectrumModel(rvs_instrument)
    m_h = np.array([-2.0, -1.5, -1.0, -0.5, 0.0, 0.4])
    ew_m = cat_ew(model, params(6, m_h=m_h, teff=5000.0, logg=2.5))
    assert np.all(np.diff(ew_m) > 0), ew_m
    assert ew_m[-1] / ew_m[0] > 3
    logg = np.array([1.0, 2.0, 3.0, 4.0, 4.8])
    ew_g = cat_ew(model, params(5, logg=logg, teff=5000.0, m_h=0.0))
    assert np.all(np.diff(ew_g) > 0), ew_g
    # solar-like star: the triplet's total equivalent width is of the observed order (0.6-0.9 nm)
    sun = cat_ew(model, params(1, teff=5777.0, logg=4.44))
    assert 0.5 < sun[0] < 1.0


def test_paschen_lines_only_in_hot_stars(rvs_instrument):
    no_h = Instrument(**{**rvs_instrument.model_dump(),
                         "lines": [ln for ln in rvs_instrument.model_dump()["lines"] if ln["element"] != "H"]})
    with_h, without_h = SpectrumModel(rvs_instrument), SpectrumModel(no_h)
    teff = np.array([4000.0, 5000.0, 5777.0, 6200.0, 7500.0, 8500.0, 9500.0])
    p = params(7, teff=teff, logg=4.0)
    depth = np.abs(with_h.spectra(p) - without_h.spectra(p)).max(axis=1)
    assert np.all(depth[:3] < 2e-3), depth
    assert np.all(depth[4:] > 0.03) and np.all(depth[5:] > 0.1), depth
    assert np.all(np.diff(depth[:6]) > 0)


def test_lsf_gives_the_instrument_resolution(rvs_instrument):
    model = SpectrumModel(rvs_instrument)
    # a weak, narrow Fe line: observed FWHM ~ lambda / R (intrinsic width adds in quadrature)
    flux = model.spectra(params(1, teff=5000.0, logg=2.5, vbroad=1.0))[0]
    wave = rvs_instrument.wave
    centre = min((ln.wavelength for ln in rvs_instrument.lines if ln.species == "Fe I"),
                 key=lambda w: abs(w - 869.10))  # Fe I 868.86 nm (air)
    sel = np.abs(wave - centre) < 0.15
    depth = 1 - flux[sel]
    half = depth >= depth.max() / 2
    fwhm = half.sum() * rvs_instrument.wavelength.step
    expected = centre / rvs_instrument.resolution
    assert expected * 0.9 < fwhm < expected * 1.5


def test_flux_is_physical_and_sb2_doubles_lines(rvs_instrument):
    model = SpectrumModel(rvs_instrument)
    p = params(3, teff=[4500.0, 6000.0, 9000.0], logg=[2.0, 4.2, 4.0], m_h=[0.3, -1.0, 0.0])
    flux = model.spectra(p)
    assert np.all(flux > 0.1) and np.all(flux <= 1.0 + 1e-9)
    single = params(1, teff=5200.0, logg=4.4)
    sb2 = model.binary_spectra(single, dict(single), np.array([1.0]), np.array([100.0]))[0]
    wave = rvs_instrument.wave
    win = np.abs(wave - CAT[1]) < 0.6
    f = sb2[win]
    local_min = (f[1:-1] < f[:-2]) & (f[1:-1] < f[2:]) & (f[1:-1] < 0.75)
    mins = wave[win][1:-1][local_min]
    assert mins.size >= 2 and mins.max() - mins.min() > 0.2  # 100 km/s = 0.285 nm


def test_lithium_line_follows_a_li(hr15n_instrument):
    model = SpectrumModel(hr15n_instrument)
    a_li = np.array([0.5, 1.5, 2.5, 3.3])
    flux = model.spectra(params(4, teff=5800.0, logg=4.3, a_li=a_li))
    ew = equivalent_width(hr15n_instrument.wave, flux, 670.78, 0.04)
    assert np.all(np.diff(ew) > 0) and ew[-1] > 0.01 and ew[0] < 0.001


def test_rotation_broadens_lines_at_a_conserved_equivalent_width(rvs_instrument):
    """Rotation convolves the stellar flux: past VBROAD_LINE_KMS the Ca II lines get shallower and wider
    while their equivalent widths stay put (in the opacity they grew 70 % from 5 to 25 km/s), and the
    interstellar band, which is not on the star, keeps its depth."""
    from stellar.synth.spectra import VBROAD_LINE_KMS, rotation_kms

    model = SpectrumModel(rvs_instrument)
    vb = np.array([VBROAD_LINE_KMS, 20.0, 40.0, 80.0])
    p = params(4, teff=5000.0, logg=2.5, vbroad=vb, a_v=3.0)
    flux = model.spectra(p)
    wave = rvs_instrument.wave
    # the whole spectrum's line absorption is conserved (a little leaks past the edges), and each
    # Ca II line's, measured +-1.5 nm, up to neighbours' broadened wings spilling in
    total = np.sum(1.0 - flux, axis=1)
    np.testing.assert_allclose(total / total[0], 1.0, atol=0.015)
    for c in CAT:
        ew = equivalent_width(wave, flux, c, 1.5)
        np.testing.assert_allclose(ew[:3] / ew[0], 1.0, atol=0.03)
        depth = 1.0 - flux[:, np.abs(wave - c) < 0.05].min(axis=1)
        assert np.all(np.diff(depth) < 0) and depth[-1] < 0.6 * depth[0], depth
    dib = (1.0 - flux[:, np.abs(wave - 862.28) < 0.05].min(axis=1)) - (
        1.0 - model.spectra(params(4, teff=5000.0, logg=2.5, vbroad=vb, a_v=0.0))[:, np.abs(wave - 862.28) < 0.05]
        .min(axis=1))
    assert dib[0] > 0.01 and np.allclose(dib, dib[0], rtol=0.1), dib
    assert rotation_kms(np.array([5.0, VBROAD_LINE_KMS]))[1] == 0.0 and rotation_kms(np.array([26.0]))[0] == 24.0


def test_macroturbulence_convolves_the_flux_and_microturbulence_follows_log_g(rvs_instrument):
    """vbroad below VBROAD_LINE_KMS is macroturbulence, a flux convolution: the Ca II lines get shallower at
    a conserved equivalent width. In the opacity, as it was, the total line absorption of a K giant grew
    2.5x from 1 to 9 km/s, a per-star nuisance larger than the [M/H] trend. Microturbulence, the only
    broadening in the opacity, is a function of log g, so the labels set the saturated lines' strength."""
    from stellar.synth.spectra import microturbulence_kms

    model = SpectrumModel(rvs_instrument)
    wave = rvs_instrument.wave
    for teff, logg in ((4300.0, 1.5), (5800.0, 4.4)):
        flux = model.spectra(params(3, teff=teff, logg=logg, vbroad=np.array([1.0, 5.0, 9.0])))
        total = np.sum(1.0 - flux, axis=1)
        np.testing.assert_allclose(total / total[0], 1.0, atol=0.005)
        for c in CAT:
            np.testing.assert_allclose(equivalent_width(wave, flux, c, 1.5) / equivalent_width(wave, flux, c, 1.5)[0],
                                       1.0, atol=0.005)
        depth = 1.0 - flux[:, np.abs(wave - CAT[1]) < 0.05].min(axis=1)
        assert np.all(np.diff(depth) < 0), depth
    xi = microturbulence_kms(np.array([1.0, 2.5, 4.4]))
    assert np.all(np.diff(xi) < 0) and 1.9 < xi[0] < 2.4 and 0.8 < xi[2] < 1.2
    # a metal-poor giant's lines stay weaker than a metal-rich one's at any broadening (the old nuisance:
    # [M/H] -1 at 9 km/s absorbed more than [M/H] -0.5 at 1 km/s)
    f = model.spectra(params(2, teff=4300.0, logg=1.5, m_h=np.array([-1.0, -0.5]), vbroad=np.array([9.0, 1.0])))
    assert np.sum(1.0 - f[0]) < np.sum(1.0 - f[1])
