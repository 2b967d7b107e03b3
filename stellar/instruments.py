"""Instrument presets: wavelength grid, resolution, label set and line list.

Everything instrument-specific lives in a YAML preset under
``conf/instruments/``; the generator, preprocessing and models read it from
here, so a new spectrograph is a new file, not new code.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from stellar.config import StrictModel, load_preset

# Elements whose abundance follows [M/H] + [alpha/M]; the rest follow [Fe/H] (or [M/H]).
ALPHA_ELEMENTS = frozenset({"O", "Mg", "Si", "S", "Ca", "Ti"})
KNOWN_LABELS = ("teff", "logg", "m_h", "alpha_m", "fe_h", "a_li")


class WavelengthGrid(StrictModel):
    """An instrument's pixel grid: start, stop and step in nm (a whole number of steps apart) and the medium."""

    start: float = Field(gt=0)
    stop: float = Field(gt=0)
    step: float = Field(gt=0)
    unit: Literal["nm"] = "nm"
    medium: Literal["vacuum", "air"] = "vacuum"

    @model_validator(mode="after")
    def _check(self) -> "WavelengthGrid":
        if self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must exceed start ({self.start})")
        n = (self.stop - self.start) / self.step
        if abs(n - round(n)) > 1e-6:
            raise ValueError("(stop - start) must be a whole number of steps")
        return self

    @property
    def n_pixels(self) -> int:
        """Number of pixels, both ends included."""
        return int(round((self.stop - self.start) / self.step)) + 1

    def array(self) -> np.ndarray:
        """Pixel centres; built from integer indices so every caller gets identical floats."""
        return np.round(self.start + self.step * np.arange(self.n_pixels), 6)


class Line(StrictModel):
    """One absorption feature of the empirical line model (see stellar.synth.spectra).

    ``strength`` is log10 of the line's column (integrated optical depth, nm) at
    the solar reference (5777 K, log g 4.44, solar abundances).
    """

    species: str
    wavelength: float = Field(gt=0, description="line centre in the grid's medium, nm")
    element: str
    kind: Literal["metal", "hydrogen", "dib"] = "metal"
    ion: Literal[1, 2] = 1
    chi_exc: float = Field(0.0, ge=0, description="excitation potential of the lower level, eV")
    chi_ion: float = Field(7.9, ge=0, description="ionisation potential of the neutral, eV")
    strength: float
    # Lorentzian half width at the solar reference (nm): pressure broadening that
    # scales with log g; large for the Ca II triplet and the Stark-broadened Paschen lines.
    gamma: float = Field(0.0005, ge=0)
    # Extra label this line responds to (e.g. the Li line follows a_li rather than [M/H]).
    label: str | None = None
    # Intrinsic Gaussian FWHM (nm) of a diffuse interstellar band; unused for stellar lines.
    width: float = Field(0.0, ge=0)


class Instrument(StrictModel):
    """An instrument preset (``conf/instruments/<name>.yaml``): wavelength grid, resolution, label set, the
    generator's spectrum format and S/N model, and the line list."""

    name: str
    description: str = ""
    wavelength: WavelengthGrid
    resolution: float = Field(gt=100)
    labels: list[str] = Field(min_length=1)
    # How the generator writes spectra: Gaia's bulk RVS ECSV, or a FITS table per file.
    spectrum_format: Literal["gaia_rvs_ecsv", "fits_table"]
    # Instrument-level noise floor and S/N model of the generator.
    snr_at_limit: float = Field(15.0, gt=0, description="S/N of a star at the sample's magnitude limit")
    lines: list[Line] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "Instrument":
        unknown = [lab for lab in self.labels if lab not in KNOWN_LABELS]
        if unknown:
            raise ValueError(f"unknown labels {unknown}; known: {list(KNOWN_LABELS)}")
        return self

    @cached_property
    def wave(self) -> np.ndarray:
        """The pixel centres (nm), computed once per instance."""
        return self.wavelength.array()

    @property
    def n_pixels(self) -> int:
        """Number of pixels of the instrument's grid."""
        return self.wavelength.n_pixels


def load_instrument(name_or_path: str, conf_dir: str | None = None) -> Instrument:
    """Load a preset by name (``gaia_rvs``) or by path to a YAML file."""
    return load_preset("instruments", name_or_path, Instrument, conf_dir, "instrument")
