import numpy as np

from stellar.healpix import healpix_index, lonlat_of_pixels, pixels_of_lonlat
from stellar.synth.xp import N_BASES, XpModel, correlation_matrix, hermite_functions, upper_triangle


def test_hermite_functions_are_orthonormal():
    x = np.linspace(-15, 15, 6001)
    phi = hermite_functions(x)
    gram = phi @ phi.T * (x[1] - x[0])
    assert np.allclose(gram, np.eye(N_BASES), atol=1e-6)


def test_xp_coefficients_track_temperature_and_reconstruct():
    xp = XpModel()
    teff = np.array([4000.0, 5500.0, 7500.0])
    flux = {"bp": np.full(3, 1e4), "rp": np.full(3, 1e4)}
    coeff = xp.coefficients(teff, np.zeros(3), np.zeros(3), flux)
    assert coeff["bp"].shape == (3, N_BASES)
    # fixed band flux: the SED shape must differ with Teff, smoothly (power falls with order)
    assert np.linalg.norm(coeff["bp"][0] - coeff["bp"][2]) > 0.05 * np.linalg.norm(coeff["bp"][0])
    lam, x, resp = xp.grid["bp"]
    sed = xp.sed(lam, teff, np.zeros(3), np.zeros(3)) * resp
    sed = sed / sed.sum(axis=1, keepdims=True)
    recon = coeff["bp"] / (1e4 * len(x) / 40.0) @ hermite_functions(x)
    # the 55-term Hermite series reproduces the band-limited SED to ~1 % of its peak
    assert np.abs(recon - sed).max() < 0.01 * sed.max()


def test_correlations_are_a_valid_matrix():
    for band in ("bp", "rp"):
        c = correlation_matrix(band)
        assert np.all(np.linalg.eigvalsh(c) > 0)
        assert upper_triangle(c).size == 1485


def test_source_id_healpix_roundtrip():
    rng = np.random.default_rng(1)
    hp12 = rng.integers(0, 12 * 4**12, 500)
    ra, dec = lonlat_of_pixels(12, hp12, rng.random(500), rng.random(500))
    assert np.array_equal(pixels_of_lonlat(12, ra, dec), hp12)
    source_id = (hp12 << 35) | rng.integers(0, 2**35, 500)
    assert np.array_equal(healpix_index(source_id, 12), hp12)
    assert np.array_equal(healpix_index(source_id, 8), hp12 >> 8)


def test_real_source_ids_decode(real_data):
    """The real Gaia rows: source_id >> 35 is the level-12 pixel of the star's position."""
    from astropy.table import Table

    t = Table.read(real_data / "astroquery_gaia" / "1712337806100O-result.ecsv", format="ascii.ecsv")
    sid = np.asarray(t["source_id"], dtype=np.int64)
    assert np.array_equal(healpix_index(sid, 12), pixels_of_lonlat(12, t["ra"], t["dec"]))
