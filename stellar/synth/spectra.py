"""Synthetic continuum-normalised spectra from an empirical, physically motivated line model.

Each line of the instrument preset is a pseudo-Voigt optical-depth profile
whose column follows the stellar labels the way real lines do:

* metals: ``log N = strength + [X/H] + Boltzmann/Saha term + gravity term``;
  neutral lines of mostly-ionised species strengthen as Teff falls
  (``(theta - theta_sun) * (chi_ion - chi_exc)``), ionised lines (Ca II
  triplet) weaken slowly with log g (``-(log g - 4.44) / 3``) while their
  pressure-broadened Lorentzian wings grow as ``10**(0.5 (log g - 4.44))``,
  so the triplet's equivalent width rises with both [M/H] and log g;
  all metal lines fade above 6500 K as the metals ionise further;
* hydrogen (Paschen, H-alpha): Boltzmann population of the lower level
  (chi = 12.09 eV for Paschen), so the lines appear only in hot stars, and
  fade again above 9500 K as hydrogen ionises; Stark (Lorentzian) wings;
* diffuse interstellar bands: a Gaussian whose strength follows extinction.

Line broadening: thermal motion and microturbulence widen the Gaussian part
of each opacity profile; microturbulence follows log g (``xi = 2.478 -
0.325 log g`` km/s, the APOGEE giants' relation of Holtzman et al. 2015,
about 1 km/s on the main sequence), so it is set by the labels, as the
Cannon and every label-trained model assume. The star's ``vbroad`` is
macroturbulence up to ``VBROAD_LINE_KMS`` and rotation beyond it, ``v sin i
= sqrt(vbroad^2 - VBROAD_LINE_KMS^2)``; both are what they are in a real
star, a convolution of the emergent stellar flux -- with a Gaussian of
dispersion ``v_macro / sqrt(2)`` and with the rotation profile (Gray, *The
Observation and Analysis of Stellar Photospheres*, eq. 18.14, linear limb
darkening ``LIMB_DARKENING``) -- which makes lines shallower and wider at a
conserved equivalent width. (Putting either into the opacity instead grows
saturated lines' equivalent widths with it: with macroturbulence there, a
random 5 +- 2 km/s per star changed the Ca II triplet's strength from star to
star by more than its [M/H] and log g trends do, a nuisance real stars do
not have; a quadratic Cannon fitted at the true labels then misfitted
spectra at S/N > 80 by chi2/pixel 12.) The interstellar band is applied
after the broadening: it is not on the star.

The intrinsic spectrum is computed on a grid padded beyond the
instrument range, convolved with a Gaussian line-spread function of the
instrument's resolving power by FFT, and cropped. Everything is vectorised
over a batch of stars; the only Python loop is over the ~40 lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sp_fft

from stellar.instruments import ALPHA_ELEMENTS, Instrument

C_KMS = 299_792.458
K_B = 1.380649e-23
AMU = 1.66053907e-27
THETA_SUN = 5040.0 / 5777.0
LOGG_SUN = 4.44
A_LI_SUN = 1.05
# microturbulence xi = MICRO_A + MICRO_B log g (km/s), within MICRO_RANGE
MICRO_A, MICRO_B, MICRO_RANGE = 2.478, -0.325, (0.5, 3.0)
ATOMIC_MASS = {
    "H": 1.008, "Li": 6.94, "C": 12.01, "N": 14.01, "O": 16.0, "Mg": 24.31, "Si": 28.09,
    "S": 32.06, "Ca": 40.08, "Ti": 47.87, "Cr": 52.0, "Fe": 55.85, "Ni": 58.69, "Ba": 137.33,
}
# Half width (nm) of the window in which a weak line is evaluated.
WEAK_WINDOW_NM = 0.5
MAX_RV_KMS = 150.0
MAX_DEPTH = 0.85
TAU_NEGLIGIBLE = 1e-4

KIND_METAL, KIND_HYDROGEN, KIND_DIB = 0, 1, 2
# vbroad up to this (km/s) is macroturbulence (a Gaussian flux convolution); beyond it, rotation
VBROAD_LINE_KMS = 10.0
LIMB_DARKENING = 0.6  # linear limb-darkening coefficient of the rotation profile (near 860 nm, FGK stars)


def microturbulence_kms(logg: np.ndarray) -> np.ndarray:
    """Microturbulence (km/s) from log g: the only broadening that enters the line opacity."""
    return np.clip(MICRO_A + MICRO_B * np.asarray(logg, dtype=np.float64), *MICRO_RANGE)


def macroturbulence_kms(vbroad: np.ndarray) -> np.ndarray:
    """The macroturbulence (km/s) part of ``vbroad``: all of it up to VBROAD_LINE_KMS."""
    return np.clip(np.asarray(vbroad, dtype=np.float64), 0.0, VBROAD_LINE_KMS)


def rotation_kms(vbroad: np.ndarray) -> np.ndarray:
    """The v sin i (km/s) that rotation contributes to ``vbroad`` (0 up to VBROAD_LINE_KMS)."""
    vb = np.asarray(vbroad, dtype=np.float64)
    return np.sqrt(np.maximum(vb**2 - VBROAD_LINE_KMS**2, 0.0))


def rotation_profile_ft(half_width_pix: np.ndarray, k: np.ndarray, eps: float = LIMB_DARKENING) -> np.ndarray:
    """Fourier transform (B, K) of the unit-area rotation profile of half width ``half_width_pix`` (B,)
    at frequencies ``k`` (cycles per pixel): analytic, so a profile narrower than a pixel is exact too.

    G(x) ~ 2(1-eps) sqrt(1-x^2) + (pi eps / 2)(1-x^2) on |x| < 1 transforms to
    [2(1-eps) pi J1(u)/u + (pi eps/2) 4 (sin u - u cos u)/u^3] / [(1-eps) pi + pi eps (2/3)], u = 2 pi k x_L.
    """
    from scipy.special import j1

    u = 2.0 * np.pi * np.asarray(half_width_pix, dtype=np.float64)[:, None] * k[None, :]
    small = u < 1e-3
    us = np.where(small, 1.0, u)
    a = np.where(small, 0.5 - u**2 / 16.0, j1(us) / us)  # J1(u)/u
    b = np.where(small, 1.0 / 3.0 - u**2 / 30.0, (np.sin(us) - us * np.cos(us)) / us**3)
    c1, c2 = 2.0 * (1.0 - eps), 0.5 * np.pi * eps
    return (c1 * np.pi * a + c2 * 4.0 * b) / (c1 * np.pi * 0.5 + c2 * 4.0 / 3.0)


@dataclass(frozen=True)
class LineArrays:
    """The preset's line list as arrays, so per-batch work is array arithmetic."""

    centre: np.ndarray
    strength: np.ndarray
    chi_exc: np.ndarray
    chi_ion: np.ndarray
    ion: np.ndarray
    gamma: np.ndarray
    width: np.ndarray
    kind: np.ndarray
    mass: np.ndarray
    elements: tuple[str, ...]
    labels: tuple[str | None, ...]
    full: np.ndarray  # evaluated on the whole grid (strong wings) rather than a window

    @classmethod
    def from_instrument(cls, inst: Instrument) -> "LineArrays":
        """The preset's lines as arrays; those with strong wings (hydrogen, DIBs, gamma >= 0.002 nm) are
        marked to be evaluated on the whole grid."""
        kinds = {"metal": KIND_METAL, "hydrogen": KIND_HYDROGEN, "dib": KIND_DIB}
        lines = inst.lines
        kind = np.array([kinds[ln.kind] for ln in lines])
        gamma = np.array([ln.gamma for ln in lines], dtype=float)
        return cls(
            centre=np.array([ln.wavelength for ln in lines], dtype=float),
            strength=np.array([ln.strength for ln in lines], dtype=float),
            chi_exc=np.array([ln.chi_exc for ln in lines], dtype=float),
            chi_ion=np.array([ln.chi_ion for ln in lines], dtype=float),
            ion=np.array([ln.ion for ln in lines]),
            gamma=gamma,
            width=np.array([ln.width for ln in lines], dtype=float),
            kind=kind,
            mass=np.array([ATOMIC_MASS.get(ln.element, 50.0) for ln in lines], dtype=float),
            elements=tuple(ln.element for ln in lines),
            labels=tuple(ln.label for ln in lines),
            full=(kind != KIND_METAL) | (gamma >= 0.002),
        )


def element_abundance(element: str, label: str | None, params: dict[str, np.ndarray]) -> np.ndarray:
    """[X/H] of a line's element (dex relative to solar) from the stellar labels."""
    if label == "a_li":
        return params["a_li"] - A_LI_SUN
    if element == "Fe" and "fe_h" in params:
        return params["fe_h"]
    if element in ALPHA_ELEMENTS:
        return params["m_h"] + params["alpha_m"]
    return params["m_h"]


def line_parameters(lines: LineArrays, params: dict[str, np.ndarray], centre_wave: float):
    """Per-star, per-line log column, Lorentzian HWHM and Gaussian FWHM, each (B, L)."""
    teff = params["teff"][:, None]
    logg = params["logg"][:, None]
    theta_rel = 5040.0 / teff - THETA_SUN
    hot = np.maximum(0.0, teff - 6500.0)

    xh = np.stack([element_abundance(e, lab, params) for e, lab in zip(lines.elements, lines.labels)], axis=1)
    neutral = lines.ion == 1
    t_term = np.where(neutral, theta_rel * (lines.chi_ion - lines.chi_exc), -theta_rel * lines.chi_exc)
    g_term = np.where(neutral, 0.0, -(logg - LOGG_SUN) / 3.0)
    log_n_metal = lines.strength + xh + t_term + g_term - hot / 1500.0
    log_n_h = lines.strength - theta_rel * lines.chi_exc - np.maximum(0.0, teff - 9500.0) / 2500.0
    av = params.get("a_v", np.zeros(teff.shape[0]))[:, None]
    log_n_dib = np.log10(0.0102 * np.maximum(av, 0.0) / 3.1 + 1e-9) + lines.strength
    log_n = np.where(lines.kind == KIND_METAL, log_n_metal, np.where(lines.kind == KIND_HYDROGEN, log_n_h, log_n_dib))

    pressure = 10.0 ** (0.5 * (logg - LOGG_SUN)) * (teff / 5777.0) ** 0.3
    stark = 10.0 ** (0.4 * (logg - LOGG_SUN))
    gamma = lines.gamma * np.where(lines.kind == KIND_HYDROGEN, stark, pressure)

    xi = microturbulence_kms(logg)
    v_th2 = 2.0 * K_B * teff / (lines.mass * AMU) / 1e6  # (km/s)^2
    v_tot = np.sqrt(v_th2 + xi**2)
    fwhm_g = lines.centre / C_KMS * 2.0 * np.sqrt(np.log(2.0)) * v_tot
    fwhm_g = np.where(lines.kind == KIND_DIB, lines.width, fwhm_g)
    gamma = np.where(lines.kind == KIND_DIB, 0.0, gamma)
    return log_n, gamma, fwhm_g


def pseudo_voigt(x: np.ndarray, fwhm_g: np.ndarray, fwhm_l: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """``scale`` times the area-normalised pseudo-Voigt (Thompson, Cox & Hastings 1987), 1/nm.

    Per-star constants are folded first so the (B, n) work is one exp, one
    division and a few in-place multiply-adds.
    """
    fg, fl = fwhm_g, np.maximum(fwhm_l, 1e-12)
    f = (fg**5 + 2.69269 * fg**4 * fl + 2.42843 * fg**3 * fl**2 + 4.47163 * fg**2 * fl**3
         + 0.07842 * fg * fl**4 + fl**5) ** 0.2
    r = fl / f
    eta = 1.36603 * r - 0.47719 * r**2 + 0.11116 * r**3
    ln2 = np.log(2.0)
    amp_g = (scale * (1.0 - eta) * (2.0 / f) * np.sqrt(ln2 / np.pi)).astype(x.dtype)
    rate_g = (-4.0 * ln2 / f**2).astype(x.dtype)
    half2 = ((f / 2.0) ** 2).astype(x.dtype)
    amp_l = (scale * eta * (f / 2.0) / np.pi).astype(x.dtype)
    x2 = np.square(x)
    out = np.multiply(x2, rate_g)
    np.exp(out, out=out)
    out *= amp_g
    x2 += half2
    np.divide(amp_l, x2, out=x2)
    out += x2
    return out


class SpectrumModel:
    """Noiseless spectra for one instrument; build once, call per batch."""

    def __init__(self, instrument: Instrument):
        self.instrument = instrument
        self.lines = LineArrays.from_instrument(instrument)
        grid = instrument.wavelength
        self.step = grid.step
        self.centre_wave = 0.5 * (grid.start + grid.stop)
        sigma_nm = self.centre_wave / instrument.resolution / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        self.sigma_pix = sigma_nm / self.step
        self.window = int(np.ceil((WEAK_WINDOW_NM + self.centre_wave * MAX_RV_KMS / C_KMS) / self.step))
        self.pad = int(np.ceil(6 * self.sigma_pix)) + self.window
        n_ext = grid.n_pixels + 2 * self.pad
        self.n_fft = sp_fft.next_fast_len(n_ext + int(np.ceil(6 * self.sigma_pix)), real=True)
        idx = np.arange(-self.pad, grid.n_pixels + self.pad)
        self.wave_ext = grid.start + self.step * idx
        self.freq = np.fft.rfftfreq(self.n_fft)  # cycles per pixel, for the LSF and rotation transforms
        self.lsf_ft = np.exp(-2.0 * (np.pi * self.freq * self.sigma_pix) ** 2)
        # Weak lines far outside the padded grid cannot contribute.
        lo, hi = self.wave_ext[0] - WEAK_WINDOW_NM, self.wave_ext[-1] + WEAK_WINDOW_NM
        self.active = (self.lines.centre > lo) & (self.lines.centre < hi) | self.lines.full

    def optical_depth(self, params: dict[str, np.ndarray], rv_kms: np.ndarray | None = None,
                      interstellar: bool | None = None) -> np.ndarray:
        """tau on the padded grid, shape (B, n_ext): of all lines, or (``interstellar`` True / False) of
        the interstellar bands only / the stellar lines only."""
        n_star = params["teff"].shape[0]
        log_n, gamma, fwhm_g = line_parameters(self.lines, params, self.centre_wave)
        column = 10.0**log_n
        shift = 1.0 + (np.zeros(n_star) if rv_kms is None else rv_kms) / C_KMS
        # Rough peak optical depth; a line is evaluated only for the stars where it can
        # reach TAU_NEGLIGIBLE (Paschen lines in cool stars cost nothing).
        peak = column / np.maximum(fwhm_g, 2.0 * gamma)
        tau = np.zeros((n_star, self.wave_ext.size), dtype=np.float32)
        active = self.active if interstellar is None else self.active & (
            (self.lines.kind == KIND_DIB) == interstellar)
        for j in np.flatnonzero(active):
            rows = np.flatnonzero(peak[:, j] > TAU_NEGLIGIBLE)
            if rows.size == 0:
                continue
            if self.lines.full[j]:
                lo, hi = 0, self.wave_ext.size
            else:
                c_idx = int(round((self.lines.centre[j] - self.wave_ext[0]) / self.step))
                lo, hi = max(0, c_idx - self.window), min(self.wave_ext.size, c_idx + self.window + 1)
                if hi <= lo:
                    continue
            x = (self.wave_ext[None, lo:hi] - self.lines.centre[j] * shift[rows, None]).astype(np.float32)
            prof = pseudo_voigt(x, fwhm_g[rows, j, None], 2.0 * gamma[rows, j, None], column[rows, j, None])
            if rows.size == n_star:
                tau[:, lo:hi] += prof
            else:
                tau[rows, lo:hi] += prof
        return tau

    def convolve(self, flux_ext: np.ndarray) -> np.ndarray:
        """Apply the instrumental LSF to the line depth (zero outside, so no edge artefacts) and crop."""
        depth = 1.0 - flux_ext
        spec = sp_fft.rfft(depth, n=self.n_fft, axis=1, workers=1)
        conv = sp_fft.irfft(spec * self.lsf_ft, n=self.n_fft, axis=1, workers=1)
        n_pix = self.instrument.n_pixels
        return 1.0 - conv[:, self.pad : self.pad + n_pix]

    def broaden(self, flux_ext: np.ndarray, vsini_kms: np.ndarray, vmacro_kms: np.ndarray) -> np.ndarray:
        """The padded-grid flux (B, n_ext) convolved with each star's (B,) rotation profile and Gaussian
        macroturbulence (km/s; dispersion vmacro / sqrt(2)): one FFT pair for both."""
        kms_pix = self.centre_wave / C_KMS / self.step
        sigma = np.asarray(vmacro_kms, dtype=np.float64) / np.sqrt(2.0) * kms_pix
        spec = sp_fft.rfft(1.0 - flux_ext, n=self.n_fft, axis=1, workers=1)
        spec *= np.exp(-2.0 * (np.pi * self.freq[None, :] * sigma[:, None]) ** 2)
        spin = np.asarray(vsini_kms, dtype=np.float64) > 0
        if spin.any():
            spec[spin] *= rotation_profile_ft(np.asarray(vsini_kms, dtype=np.float64)[spin] * kms_pix, self.freq)
        return 1.0 - sp_fft.irfft(spec, n=self.n_fft, axis=1, workers=1)[:, : flux_ext.shape[1]]

    def intrinsic(self, params: dict[str, np.ndarray], rv_kms: np.ndarray | None = None) -> np.ndarray:
        """Noiseless normalised flux on the padded grid before the LSF, (B, n_ext): line depths capped at
        MAX_DEPTH, the star's lines broadened by rotation and macroturbulence (from ``vbroad``), the
        interstellar bands laid over them unbroadened; ``rv_kms`` Doppler-shifts the lines."""
        # Line cores never reach zero flux in real stars (scattering, non-LTE source
        # functions): cap the depth at MAX_DEPTH, Schuster-Schwarzschild style.
        n = params["teff"].shape[0]
        vbroad = np.asarray(params.get("vbroad", np.zeros(n)), dtype=np.float64)
        vsini, vmacro = rotation_kms(vbroad), macroturbulence_kms(vbroad)

        def capped(tau):  # exp in float32, as the opacity is
            np.negative(tau, out=tau)
            np.exp(tau, out=tau)
            return 1.0 - MAX_DEPTH * (1.0 - tau.astype(np.float64))

        if not ((vsini > 0) | (vmacro > 0)).any():  # one opacity, one cap
            return capped(self.optical_depth(params, rv_kms))
        # the star's own lines are broadened, the interstellar bands then laid over them
        star = self.broaden(capped(self.optical_depth(params, rv_kms, interstellar=False)), vsini, vmacro)
        return star * capped(self.optical_depth(params, rv_kms, interstellar=True))

    def spectra(self, params: dict[str, np.ndarray], rv_kms: np.ndarray | None = None) -> np.ndarray:
        """Noiseless normalised flux at instrument resolution, (B, n_pixels) float64."""
        return self.convolve(self.intrinsic(params, rv_kms))

    def binary_spectra(self, primary: dict[str, np.ndarray], secondary: dict[str, np.ndarray],
                       light_ratio: np.ndarray, dv_kms: np.ndarray) -> np.ndarray:
        """Double-lined binaries: two stars shifted by +-dv/2, weighted by their continuum light."""
        f1 = self.intrinsic(primary, -0.5 * dv_kms)
        f2 = self.intrinsic(secondary, 0.5 * dv_kms)
        w = (light_ratio / (1.0 + light_ratio))[:, None]
        return self.convolve((1.0 - w) * f1 + w * f2)


def equivalent_width(wave: np.ndarray, flux: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    """Equivalent width (nm) of normalised flux within +-half_width of centre; (B,)."""
    sel = np.abs(wave - centre) <= half_width
    step = float(np.median(np.diff(wave)))
    return np.nansum(1.0 - flux[:, sel], axis=1) * step
