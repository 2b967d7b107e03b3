"""A Milky-Way-like stellar population: labels, distances, photometry, astrometry.

Deliberately simple but with the structure the science needs:
thin disc / thick disc / halo components with their [M/H] distributions and
the [alpha/M] bimodality (thin disc near 0, thick disc and halo near +0.3);
dwarfs, subgiants, red-giant-branch and red-clump stars along a rough
isochrone locus (metal-poor giants hotter); a magnitude-limited G_RVS sample
whose faint third has S/N 15-25; distances, extinction, parallaxes with
Gaia-like errors, G/BP/RP from Teff, luminosity and reddening.

Out-of-distribution stars (hot stars, extremely metal-poor giants,
double-lined binaries) are drawn separately and flagged; the generator never
puts them in the training label catalogue.
"""

from __future__ import annotations

import numpy as np

OOD_NONE, OOD_HOT, OOD_EMP, OOD_SB2 = 0, 1, 2, 3
OOD_NAMES = {OOD_NONE: "", OOD_HOT: "hot_star", OOD_EMP: "extremely_metal_poor", OOD_SB2: "sb2_binary"}
COMPONENT_NAMES = ("thin_disc", "thick_disc", "halo")

# Gaia DR3 photometric zero points (Vega, e-/s).
ZP_G, ZP_BP, ZP_RP = 25.6874, 25.3385, 24.7479
R_SUN_KPC, Z_SUN_KPC = 8.122, 0.0208


def _component(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(3, size=n, p=[0.72, 0.23, 0.05])


def _chemistry(rng: np.random.Generator, comp: np.ndarray, kind: np.ndarray,
               emp_m_h: tuple[float, float] = (-4.0, -3.0)) -> tuple[np.ndarray, np.ndarray]:
    n = comp.size
    m_h = np.select(
        [comp == 0, comp == 1, comp == 2],
        [rng.normal(-0.05, 0.22, n), rng.normal(-0.55, 0.25, n), rng.normal(-1.55, 0.45, n)],
    )
    m_h = np.clip(m_h, -2.5, 0.5)
    # Thin disc: [alpha/M] ~ 0 with a mild slope; thick disc/halo: the high-alpha sequence.
    alpha_thin = np.clip(-0.12 * m_h + rng.normal(0.0, 0.035, n), -0.1, 0.2)
    alpha_thick = np.clip(0.30 - 0.04 * np.maximum(m_h + 0.5, 0) + rng.normal(0.0, 0.035, n), 0.12, 0.45)
    alpha_m = np.where(comp == 0, alpha_thin, alpha_thick)
    emp = kind == OOD_EMP
    if emp.any():
        m_h[emp] = rng.uniform(*emp_m_h, emp.sum())
        alpha_m[emp] = rng.normal(0.4, 0.05, emp.sum())
    return m_h, alpha_m


def _evolution(rng: np.random.Generator, m_h: np.ndarray, kind: np.ndarray,
               hot_teff: tuple[float, float] = (7500.0, 11500.0),
               emp_dwarf_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teff and log g along a rough isochrone locus; returns (teff, logg, stage).

    Extremely metal-poor stars are giants, and a share ``emp_dwarf_fraction`` of them turn-off dwarfs
    (5,600-6,500 K, log g 4.0-4.5), made from the same draws so the random stream does not change."""
    n = m_h.size
    # stage: 0 dwarf, 1 subgiant, 2 RGB, 3 red clump
    stage = rng.choice(4, size=n, p=[0.38, 0.10, 0.37, 0.15])
    teff = np.empty(n)
    logg = np.empty(n)
    d = stage == 0
    t = rng.uniform(0.0, 1.0, d.sum())
    teff[d] = 4100 + 2500 * t**0.8 - 120 * m_h[d] + rng.normal(0, 60, d.sum())
    logg[d] = 4.72 - 0.55 * ((teff[d] - 4000) / 2600) ** 2 + rng.normal(0, 0.06, d.sum())
    s = stage == 1
    logg[s] = rng.uniform(3.5, 4.1, s.sum())
    teff[s] = 5000 + 900 * (logg[s] - 3.5) / 0.6 - 150 * m_h[s] + rng.normal(0, 80, s.sum())
    r = stage == 2
    logg[r] = 0.8 + 2.8 * rng.power(1.6, r.sum())
    teff[r] = 4650 + 330 * (logg[r] - 2.5) - 320 * m_h[r] + rng.normal(0, 70, r.sum())
    c = stage == 3
    logg[c] = rng.normal(2.45, 0.08, c.sum())
    teff[c] = 4750 - 180 * m_h[c] + rng.normal(0, 70, c.sum())
    hot = kind == OOD_HOT
    if hot.any():
        teff[hot] = rng.uniform(*hot_teff, hot.sum())
        logg[hot] = rng.uniform(3.6, 4.3, hot.sum())
        stage[hot] = 0
    emp = kind == OOD_EMP
    if emp.any():
        stage[emp] = 2
        logg[emp] = rng.uniform(1.0, 2.8, emp.sum())
        u = (logg[emp] - 1.0) / 1.8
        teff[emp] = 4650 + 330 * (logg[emp] - 2.5) + 900 + rng.normal(0, 70, emp.sum())
        if emp_dwarf_fraction > 0:  # the lowest draws become dwarfs near the metal-poor turn-off
            dw = u < emp_dwarf_fraction
            v = u[dw] / emp_dwarf_fraction
            idx = np.flatnonzero(emp)[dw]
            stage[idx] = 0
            teff[idx] = teff[idx] - (4650 + 330 * (logg[idx] - 2.5) + 900) + 5600 + 900 * v  # keeps the scatter
            logg[idx] = 4.0 + 0.5 * v
    return np.clip(teff, 3500, 12000), np.clip(logg, 0.5, 5.0), stage


def bp_rp_intrinsic(teff: np.ndarray, m_h: np.ndarray) -> np.ndarray:
    """(BP-RP)_0 from inverting a colour-Teff relation of the Casagrande et al. form."""
    theta = 5040.0 / teff
    # theta = 0.4929 + 0.5092 C - 0.0353 C^2 + 0.0150 [M/H]; solve the quadratic for C.
    a, b, c0 = -0.0353, 0.5092, 0.4929 + 0.015 * m_h - theta
    disc = np.maximum(b * b - 4 * a * c0, 0.0)
    return np.clip((-b + np.sqrt(disc)) / (2 * a), -0.3, 4.0)


def bolometric_correction_g(teff: np.ndarray) -> np.ndarray:
    """BC_G (Andrae et al. 2018 polynomial, clipped to its range)."""
    dt = np.clip(teff, 3300, 8000) - 5772.0
    return 6.0e-02 + 6.731e-05 * dt - 6.647e-08 * dt**2 + 2.859e-11 * dt**3 - 7.197e-15 * dt**4


def absolute_g(teff: np.ndarray, logg: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Absolute G magnitude from Teff, log g and mass (L ~ M Teff^4 / g, then the bolometric correction)."""
    log_l = np.log10(mass) - (logg - 4.438) + 4.0 * np.log10(teff / 5772.0)
    return 4.74 - 2.5 * log_l - bolometric_correction_g(teff)


# The sample's G_RVS distribution: counts grow as 10^(GRVS_COUNT_SLOPE m) from GRVS_BRIGHTEST to the limit.
GRVS_BRIGHTEST = 7.0
GRVS_COUNT_SLOPE = 0.17


def draw_population(rng: np.random.Generator, n: int, ood_fraction: float, grvs_limit: float,
                    snr_at_limit: float, gal_b_deg: np.ndarray, extinction_scale: float = 1.0,
                    sb2_dv_kms: tuple[float, float] = (40.0, 120.0),
                    sb2_blend: bool = False, hot_teff: tuple[float, float] = (7500.0, 11500.0),
                    emp_m_h: tuple[float, float] = (-4.0, -3.0),
                    emp_dwarf_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """All per-star truth quantities for ``n`` stars at the given Galactic latitudes.

    ``extinction_scale`` multiplies the dust layer's extinction per kpc (realism.extinction_scale).
    ``sb2_dv_kms``: the range of the two components' velocity separation |dv| (realism.sb2_dv_kms).
    ``sb2_blend`` (realism.sb2_blend): secondaries from 0.65 to 1 of the primary's Teff whose light
    follows it as on the main sequence (RVS-band light ratio ~ (Teff2/Teff1)^5, so a 0.7 ratio gives
    0.17), their light blended into the colours (and, in the survey, the XP spectra); otherwise a
    secondary 0.8-1 of the primary's Teff at a light ratio drawn from 0.4-1 and the colours the
    primary's. ``hot_teff``, ``emp_m_h``: the injected hot and extremely metal-poor stars' Teff and [M/H]
    ranges; ``emp_dwarf_fraction``: the share of the latter that are turn-off dwarfs, not giants. The
    random stream is the same whatever these are, so the stars' other draws do not change."""
    kind = np.zeros(n, dtype=np.int8)
    is_ood = rng.random(n) < ood_fraction
    kind[is_ood] = rng.choice([OOD_HOT, OOD_EMP, OOD_SB2], size=is_ood.sum())
    comp = _component(rng, n)
    m_h, alpha_m = _chemistry(rng, comp, kind, emp_m_h)
    teff, logg, stage = _evolution(rng, m_h, kind, hot_teff, emp_dwarf_fraction)
    fe_h = m_h - 0.25 * alpha_m + rng.normal(0.0, 0.02, n)
    # A(Li): depleted in giants and cool dwarfs, ~2.5-3.2 in warm dwarfs, a few Li-rich giants.
    a_li = np.where(stage >= 2, rng.normal(0.9, 0.4, n), 1.0 + 2.1 / (1 + np.exp(-(teff - 5700) / 180)))
    a_li += rng.normal(0.0, 0.15, n)
    # (the extremely metal-poor turn-off dwarfs were drawn as giants: the draw's count must not change)
    li_rich = ((stage >= 2) | ((kind == OOD_EMP) & (stage == 0))) & (rng.random(n) < 0.01)
    a_li[li_rich] = rng.uniform(2.0, 3.5, li_rich.sum())
    a_li = np.clip(a_li, -0.5, 3.8)
    mass = np.where(stage >= 2, rng.uniform(0.9, 1.6, n), 0.6 + 0.7 * (teff - 4000) / 2600)
    mass = np.where(kind == OOD_HOT, 1.6 + (teff - 7500) / 4000 * 1.4, np.clip(mass, 0.5, 3.0))
    vbroad = np.where(kind == OOD_HOT, rng.uniform(30, 150, n), np.clip(rng.normal(5.0, 2.0, n), 1.0, 15.0))

    # SB2: a secondary of similar chemistry; brighter-than-single combined light.
    sb2 = kind == OOD_SB2
    t_ratio = rng.uniform(0.65, 1.0, n) if sb2_blend else rng.uniform(0.8, 1.0, n)
    teff2 = np.where(sb2, teff * t_ratio, np.nan)
    logg2 = np.where(sb2, np.clip(logg + rng.uniform(0.0, 0.4, n), 0.5, 5.0), np.nan)
    if sb2_blend:  # light from the Teff ratio with a 25 % scatter, never brighter than the primary
        light_ratio = np.where(sb2, np.minimum(t_ratio**5 * rng.uniform(0.8, 1.25, n), 1.0), 0.0)
    else:
        light_ratio = np.where(sb2, rng.uniform(0.4, 1.0, n), 0.0)
    dv = np.where(sb2, rng.uniform(*sb2_dv_kms, n) * rng.choice([-1, 1], n), 0.0)

    # Magnitude-limited sample: p(G_RVS) ~ 10^(0.17 m) puts about a third at S/N 15-25.
    m_lo = GRVS_BRIGHTEST
    u = rng.random(n)
    k = GRVS_COUNT_SLOPE * np.log(10.0)
    grvs = np.log(np.exp(k * m_lo) + u * (np.exp(k * grvs_limit) - np.exp(k * m_lo))) / k
    # Photon-noise S/N with a little scatter from the number of transits.
    snr = snr_at_limit * 10 ** (-0.2 * (grvs - grvs_limit)) * rng.lognormal(0.0, 0.08, n)
    snr = np.clip(snr, 8.0, 1500.0)

    bp_rp0 = bp_rp_intrinsic(teff, m_h)
    # the secondary's share of the light in BP: redder secondaries give less there than in RVS/RP
    light_ratio_bp = light_ratio.copy()
    if sb2_blend and sb2.any():
        dcol = bp_rp_intrinsic(np.where(sb2, teff2, teff), m_h) - bp_rp0
        light_ratio_bp = np.where(sb2, light_ratio * 10 ** (-0.4 * dcol), 0.0)
        bp_rp0 = bp_rp0 - 2.5 * np.log10((1.0 + light_ratio_bp) / (1.0 + light_ratio))
    g_grvs0 = np.clip(0.05 + 0.62 * bp_rp0 - 0.03 * bp_rp0**2, -0.1, 1.8)
    mg = absolute_g(teff, logg, mass) - np.where(sb2, 2.5 * np.log10(1 + light_ratio), 0.0)
    # Extinction grows with distance through a dust layer; iterate twice for self-consistency.
    sinb = np.maximum(np.abs(np.sin(np.radians(gal_b_deg))), 0.02)
    a_v = np.zeros(n)
    for _ in range(3):
        a_g = 0.83 * a_v
        g_mag = grvs + g_grvs0 + 0.25 * a_v
        dist_pc = 10 ** ((g_mag - mg - a_g + 5.0) / 5.0)
        a_v = extinction_scale * 0.7 * 0.12 / sinb * (1 - np.exp(-dist_pc / 1000.0 * sinb / 0.12)) * rng.uniform(0.8, 1.2, n)
    a_v = np.clip(a_v, 0.0, 6.0)
    e_bp_rp = 0.42 * a_v
    bp_rp = bp_rp0 + e_bp_rp
    bp_g = 0.03 + 0.38 * bp_rp + 0.08 * bp_rp**2
    g_mag = grvs + g_grvs0 + 0.25 * a_v
    bp_mag = g_mag + bp_g
    rp_mag = bp_mag - bp_rp

    plx_true = 1000.0 / dist_pc
    plx_err = np.maximum(0.012, 0.02 * 10 ** (0.2 * (g_mag - 13.0))) * rng.lognormal(0.0, 0.1, n)
    return {
        "ood_kind": kind, "component": comp.astype(np.int8), "stage": stage.astype(np.int8),
        "teff": teff, "logg": logg, "m_h": m_h, "alpha_m": alpha_m, "fe_h": fe_h, "a_li": a_li,
        "mass": mass, "vbroad": vbroad, "teff2": teff2, "logg2": logg2, "light_ratio": light_ratio,
        "light_ratio_bp": light_ratio_bp, "sb2_dv": dv, "grvs_mag": grvs, "snr": snr, "a_v": a_v, "distance_pc": dist_pc,
        "parallax_true": plx_true, "parallax_error": plx_err,
        "parallax": plx_true + plx_err * rng.standard_normal(n),
        "phot_g_mean_mag": g_mag, "phot_bp_mean_mag": bp_mag, "phot_rp_mean_mag": rp_mag,
        "bp_rp0": bp_rp0,
    }
