"""HEALPix helpers around Gaia's source_id.

A Gaia DR3 ``source_id`` carries the nested HEALPix level-12 index of the
source's position in its top bits: ``source_id >> 35``; level ``k`` is
``source_id >> (35 + 2 * (12 - k))``. Bulk files are split by level-8 ranges.
"""

from __future__ import annotations

import numpy as np

SOURCE_ID_SHIFT_L12 = 35
MAX_ORDER = 12
NPIX_L8 = 12 * 4**8
# Every valid source_id is below this: its level-12 index (source_id >> 35) is one of the 12 * 4**12 pixels
# (a larger one would land in a partition that does not exist at any order)
SOURCE_ID_END = (12 * 4**MAX_ORDER) << SOURCE_ID_SHIFT_L12


def healpix_index(source_id: np.ndarray, order: int) -> np.ndarray:
    """Nested HEALPix index at ``order`` (0..12) of each source_id."""
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"HEALPix order must be 0..12, got {order}")
    shift = SOURCE_ID_SHIFT_L12 + 2 * (MAX_ORDER - order)
    return np.asarray(source_id, dtype=np.int64) >> shift


def npix(order: int) -> int:
    """Number of HEALPix pixels at ``order`` (12 * 4**order)."""
    return 12 * 4**order


def level8_range_name(lo: int, hi: int) -> str:
    """The ``000000-003111`` suffix of Gaia bulk file names (inclusive level-8 range)."""
    return f"{lo:06d}-{hi:06d}"


def lonlat_of_pixels(order: int, pix: np.ndarray, dx: np.ndarray | float = 0.5, dy: np.ndarray | float = 0.5):
    """ICRS (ra, dec) in degrees of positions inside nested pixels (dx, dy in [0, 1))."""
    from astropy_healpix import HEALPix

    hp = HEALPix(nside=2**order, order="nested")
    lon, lat = hp.healpix_to_lonlat(np.asarray(pix, dtype=np.int64), dx=dx, dy=dy)
    return lon.deg, lat.deg


def pixels_of_lonlat(order: int, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Nested HEALPix index at ``order`` of ICRS positions (degrees): the check on the pixel a source_id
    encodes (:func:`healpix_index`)."""
    import astropy.units as u
    from astropy_healpix import HEALPix

    hp = HEALPix(nside=2**order, order="nested")
    return hp.lonlat_to_healpix(np.asarray(ra_deg) * u.deg, np.asarray(dec_deg) * u.deg)
