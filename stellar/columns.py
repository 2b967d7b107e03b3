"""One column dictionary for every published product: name, unit, UCD, description and bit meanings.

Every writer reads it: the predictions' Parquet field metadata, FITS (``TUNIT``, ``TCOMM``, bit
definitions as header comments), VOTable (unit, UCD, DESCRIPTION) and the CSV sidecar. Units are
written as each format's standard allows, so astropy reads them back without warnings:

* physical units (``K``) everywhere;
* log g, a logarithm of a quantity with units, is ``[cm/s2]`` in VOTable (CDS unit syntax, VOTable
  1.3) and has no FITS-legal form astropy reads (``log(cm.s**-2)`` is refused): FITS leaves
  ``TUNIT`` empty and says ``log10(g / cm s-2)`` in ``TCOMM``;
* abundances ([M/H], [alpha/M], [Fe/H], A(Li)) are logarithmic ratios, dimensionless: ``[-]`` in
  VOTable (CDS's dimensionless logarithm), no ``TUNIT`` in FITS with ``dex`` in ``TCOMM``.

``Column.unit`` is the unit as users read it (``K``, ``dex``), ``Column.fits_unit`` and
``Column.vo_unit`` what each format writes ("" where it has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stellar.features import QUALITY_BITS
from stellar.trust import OOD_BITS

DIMENSIONLESS = ""


@dataclass(frozen=True)
class Column:
    """A published column: its unit (``""``: dimensionless), UCD (IVOA UCD1+), description, and for a
    bitmask the meaning of every bit (bit value -> (name, meaning))."""

    name: str
    unit: str
    ucd: str
    description: str
    fits_unit: str = ""
    vo_unit: str = ""
    bits: dict[int, tuple[str, str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"name": self.name, "unit": self.unit, "ucd": self.ucd, "description": self.description}
        if self.bits:
            out["bits"] = {str(bit): {"name": n, "meaning": m} for bit, (n, m) in sorted(self.bits.items())}
        return out


# The labels a model may predict: (ucd, unit, fits unit, VOTable unit, description)
LABELS = {
    "teff": ("phys.temperature.effective", "K", "K", "K", "effective temperature"),
    "logg": ("phys.gravity", "dex", "", "[cm/s2]", "surface gravity, log10(g / cm s-2)"),
    "m_h": ("phys.abund.Z", "dex", "", "[-]", "metallicity [M/H], log10 number ratio relative to the Sun"),
    "alpha_m": ("phys.abund", "dex", "", "[-]", "alpha-element enhancement [alpha/M], log10 ratio relative to the Sun"),
    "fe_h": ("phys.abund.Fe", "dex", "", "[-]", "iron abundance [Fe/H], log10 number ratio relative to the Sun"),
    "a_li": ("phys.abund", "dex", "", "[-]", "lithium abundance A(Li) = log10(N_Li / N_H) + 12"),
}


def _bits(table: dict[str, int] | dict[str, tuple[int, str]], meanings: dict[str, str] | None = None) -> dict:
    out = {}
    for name, value in table.items():
        bit, text = value if isinstance(value, tuple) else (value, (meanings or {}).get(name, name.replace("_", " ")))
        out[bit] = (name, text)
    return out


QUALITY_MEANINGS = {
    "no_xp": "no XP coefficients for the star", "no_bp": "no BP coefficients", "no_rp": "no RP coefficients",
    "no_astrometry": "no gaia_source row (no parallax, no photometry)", "no_parallax": "no parallax",
    "negative_parallax": "parallax <= 0", "no_photometry": "G, BP or RP magnitude missing",
    "low_snr": "S/N below preprocess.low_snr", "many_masked": "more than preprocess.max_masked_fraction of the "
    "rebinned pixels masked", "edge_spike": "a spike at a spectrum edge was masked",
}


def prediction_columns(labels: list[str]) -> list[Column]:
    """The dictionary of the ``predictions`` table (and of the API's output) for ``labels``, in table order."""
    cols = [
        Column("source_id", DIMENSIONLESS, "meta.id;meta.main", "Gaia DR3 source identifier"),
        Column("hpx", DIMENSIONLESS, "pos.healpix", "nested HEALPix index of the source (from source_id) at the "
               "table's partitioning order"),
        Column("split", DIMENSIONLESS, "meta.code", "train, validation or test (stars with catalogue labels, by a "
               "hash of source_id) or observed"),
        Column("snr", DIMENSIONLESS, "stat.snr", "signal-to-noise ratio of the spectrum (rvs_spec_sig_to_noise, "
               "else the median flux / error)"),
        Column("quality", DIMENSIONLESS, "meta.code.qual", "input quality bitmask (missing inputs, masked pixels)",
               bits=_bits(QUALITY_BITS, QUALITY_MEANINGS)),
    ]
    for lab in labels:
        ucd, unit, fits_unit, vo_unit, text = LABELS.get(lab, ("phys.abund", "dex", "", "[-]", lab))
        cols.append(Column(lab, unit, f"{ucd};stat.mean", f"{text} (ensemble mean; null where withheld)",
                           fits_unit, vo_unit))
        cols.append(Column(f"{lab}_err", unit, f"stat.error;{ucd}", f"calibrated 1-sigma uncertainty of {lab}",
                           fits_unit, vo_unit))
    cols += [
        Column("out_of_range", DIMENSIONLESS, "meta.code", "bitmask: bit i set where label i (in the order of the "
               "label columns) lies outside the training labels' range",
               bits={1 << i: (lab, f"{lab} outside the training labels' range") for i, lab in enumerate(labels)}),
        Column("problem", DIMENSIONLESS, "meta.note", "why the row got no prediction (empty: it did)"),
        Column("train_like", DIMENSIONLESS, "meta.code", "the selection map's verdict: among training stars on the "
               "t-SNE map (null: no verdict)"),
        Column("selection_score", DIMENSIONLESS, "stat.fit.goodness", "share of training stars among the star's "
               "map neighbours, relative to their share in the fit set"),
        Column("spectrum_chi2", DIMENSIONLESS, "stat.fit.chi2", "reduced chi-square of the spectrum against the "
               "emulator at the predicted labels"),
        Column("line_chi2", DIMENSIONLESS, "stat.fit.chi2", "reduced chi-square over the strongest lines' windows "
               "(Ca II triplet for RVS)"),
        Column("line_broadening", DIMENSIONLESS, "stat.fit.residual", "how much broader the lines are than the "
               "emulator's at the predicted labels: the residuals' matched-filter significance against the emulated "
               "spectrum's second difference (binaries closer than the resolution element, rapid rotators)"),
        Column("ood", DIMENSIONLESS, "meta.code", "true: unlike the training set by at least one test (ood_reason "
               "says which): the one flag to filter on"),
        Column("ood_reason", DIMENSIONLESS, "meta.code", "bitmask of the out-of-distribution tests that flag the star",
               bits=_bits(OOD_BITS)),
        Column("model_name", DIMENSIONLESS, "meta.id", "registered model that predicted the row"),
        Column("model_version", DIMENSIONLESS, "meta.version", "version of that registered model"),
        Column("model_run_id", DIMENSIONLESS, "meta.id", "MLflow run that trained it"),
        Column("has_selection", DIMENSIONLESS, "meta.code", "whether train_like is known (formats without a null "
               "boolean)"),
        Column("ood_reasons", DIMENSIONLESS, "meta.note", "ood_reason as '+'-joined bit names"),
    ]
    return cols


SPATIAL_INDEX_COLUMN = "_healpix_29"  # the HATS spatial index (hats.pixel_math.spatial_index)

# Columns a HATS catalogue adds to the predictions (stellar.hats_catalog): its spatial index, the Gaia
# designation and the position joined from gaia_source
POSITION_COLUMNS = [
    Column(SPATIAL_INDEX_COLUMN, DIMENSIONLESS, "pos.healpix", "nested HEALPix index of (ra, dec) at order 29 "
           "(the HATS spatial index; from the source_id's level-12 pixel where the position is unknown)"),
    Column("designation", DIMENSIONLESS, "meta.id", "Gaia source designation ('Gaia DR3 <source_id>')"),
    Column("ra", "deg", "pos.eq.ra;meta.main", "right ascension (ICRS, Gaia epoch) from gaia_source (null: no "
           "gaia_source row)"),
    Column("dec", "deg", "pos.eq.dec;meta.main", "declination (ICRS, Gaia epoch) from gaia_source (null: no "
           "gaia_source row)"),
]


def dictionary(labels: list[str], extra: list[Column] | tuple[Column, ...] = ()) -> dict[str, Column]:
    """:func:`prediction_columns` by name, with ``extra`` columns (e.g. :data:`POSITION_COLUMNS`) beside them."""
    return {c.name: c for c in extra} | {c.name: c for c in prediction_columns(labels)}


def bit_lines(col: Column) -> list[str]:
    """A bitmask column's bits, one line each: '<column> bit <value> <name>: <meaning>'."""
    return [f"{col.name} bit {bit} {name}: {text}" for bit, (name, text) in sorted(col.bits.items())]


def with_field_metadata(table, labels: list[str], extra: list[Column] | tuple[Column, ...] = ()):
    """``table`` (pyarrow) with each known column's unit, UCD, description and bits in its field metadata
    (keys ``unit``, ``ucd``, ``description``, ``bits`` as JSON): what the Parquet products carry.
    ``extra``: columns known beyond the predictions' own (:func:`dictionary`)."""
    import json

    import pyarrow as pa

    cols = dictionary(labels, extra)
    fields = []
    for f in table.schema:
        c = cols.get(f.name)
        if c is None:
            fields.append(f)
            continue
        meta = {"unit": c.unit, "ucd": c.ucd, "description": c.description}
        if c.bits:
            meta["bits"] = json.dumps(c.as_dict()["bits"])
        fields.append(f.with_metadata({**(f.metadata or {}), **{k.encode(): v.encode() for k, v in meta.items()}}))
    return pa.Table.from_arrays(table.columns, schema=pa.schema(fields, metadata=table.schema.metadata))
