"""What each ingested table holds, and the row checks that send rows to quarantine.

Every reader (bulk ECSV, DataLink CSV/ECSV/FITS/VOTable, Parquet, FITS label
catalogues) produces typed columns plus, per row, the first parse problem;
``normalise`` adds the product's own checks (missing source_id, array
lengths, all-NaN spectra, no XP band at all), splits good rows from bad ones,
and returns the good rows in the table's canonical schema and the bad ones as
quarantine rows naming file, line, column and reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stellar.healpix import SOURCE_ID_END, healpix_index
from stellar.io.gaia_schema import gaia_table

XP_BAND_COLUMNS = ("basis_function_id", "degrees_of_freedom", "n_parameters", "n_measurements",
                   "n_rejected_measurements", "standard_deviation", "chi_squared", "coefficients",
                   "coefficient_errors", "coefficient_correlations", "n_relevant_bases", "relative_shrinking")
XP_LENGTHS = {"coefficients": 55, "coefficient_errors": 55, "coefficient_correlations": 1485}

QUARANTINE_SCHEMA = pa.schema([
    pa.field("table", pa.string()), pa.field("source_file", pa.string()), pa.field("line", pa.int64()),
    pa.field("source_id", pa.int64()), pa.field("column", pa.string()), pa.field("reason", pa.string()),
])


@dataclass(frozen=True)
class Product:
    """What one ingested table holds: its name, the Gaia table its column types come from, the columns
    kept, those a file must declare, and the fixed array lengths."""

    table: str  # output table: rvs | xp | astrometry
    gaia_table: str  # Gaia DR3 table the columns come from
    columns: tuple[str, ...]  # columns kept, in order
    required: tuple[str, ...]  # must be declared in a file's header
    lengths: tuple[tuple[str, int], ...]  # fixed array lengths

    def arrow_type(self, name: str) -> pa.DataType:
        """The Arrow type of column ``name`` from the Gaia schema (``*_coefficients`` as float64 lists)."""
        t = gaia_table(self.gaia_table).column(name).arrow_type
        if name.endswith("_coefficients"):
            return pa.list_(pa.float64())
        return t


def rvs_product(n_pixels: int) -> Product:
    """The ``rvs`` product: RVS mean spectra of ``n_pixels`` flux and flux_error values each."""
    cols = ("source_id", "solution_id", "ra", "dec", "flux", "flux_error", "combined_transits",
            "combined_ccds", "deblended_ccds")
    return Product("rvs", "rvs_mean_spectrum", cols, ("source_id", "flux", "flux_error"),
                   (("flux", n_pixels), ("flux_error", n_pixels)))


def xp_product(keep_correlations: bool) -> Product:
    """The ``xp`` product: BP and RP continuous-spectrum columns, with or without the 1485-value
    correlation arrays (``ingest.keep_xp_correlations``)."""
    cols = ["source_id", "solution_id"]
    for band in ("bp", "rp"):
        cols += [f"{band}_{c}" for c in XP_BAND_COLUMNS
                 if keep_correlations or c != "coefficient_correlations"]
    lengths = tuple((f"{b}_{c}", n) for b in ("bp", "rp") for c, n in XP_LENGTHS.items() if f"{b}_{c}" in cols)
    return Product("xp", "xp_continuous_mean_spectrum", tuple(cols),
                   ("source_id", "bp_coefficients", "rp_coefficients"), lengths)


# The gaia_source columns later stages cannot do without (preprocess's photometry and parallax features);
# the other configured ones (ingest.astrometry_columns) are kept where a file has them and null where not,
# so an archive query with only the needed columns ingests (the run summary's notes name what was absent).
ASTROMETRY_REQUIRED = ("source_id", "parallax", "parallax_error", "phot_g_mean_mag", "phot_bp_mean_mag",
                       "phot_rp_mean_mag")


def astrometry_product(columns: list[str]) -> Product:
    """The ``astrometry`` product: source_id and the configured gaia_source columns, of which a file must
    have only those in ASTROMETRY_REQUIRED."""
    cols = ["source_id"] + [c for c in columns if c != "source_id"]
    return Product("astrometry", "gaia_source", tuple(cols), tuple(c for c in cols if c in ASTROMETRY_REQUIRED), ())


def output_schema(product: Product) -> pa.Schema:
    """The canonical schema of a product's table: its columns, the derived ones (``n_nan_pixels`` for rvs,
    ``has_bp`` and ``has_rp`` for xp), and the source file and line."""
    fields = [pa.field(c, product.arrow_type(c)) for c in product.columns]
    if product.table == "rvs":
        fields.append(pa.field("n_nan_pixels", pa.int16()))
    if product.table == "xp":
        fields += [pa.field("has_bp", pa.bool_()), pa.field("has_rp", pa.bool_())]
    fields += [pa.field("source_file", pa.string()), pa.field("source_line", pa.int64())]
    return pa.schema(fields)


def _column_of(reason: str) -> str | None:
    head = reason.split(":", 1)[0]
    return head if ":" in reason and " " not in head else None


def quarantine_rows(table: str, source_file: str, lines, source_ids, reasons) -> pa.Table:
    """Quarantine rows of one source file in QUARANTINE_SCHEMA; ``column`` is read off reasons of the form
    ``column: what``."""
    reasons = list(reasons)
    return pa.table({
        "table": pa.array([table] * len(reasons), pa.string()),
        "source_file": pa.array([source_file] * len(reasons), pa.string()),
        "line": pa.array(lines, pa.int64()),
        "source_id": pa.array(source_ids, pa.int64()),
        "column": pa.array([_column_of(r) for r in reasons], pa.string()),
        "reason": pa.array(reasons, pa.string()),
    }, schema=QUARANTINE_SCHEMA)


def normalise(product: Product, columns: dict[str, pa.Array], problems: pa.Array | None,
              lines: np.ndarray, source_file: str) -> tuple[pa.Table, pa.Table]:
    """Split typed rows into (good rows in the canonical schema, quarantine rows)."""
    n = len(lines)
    checks = [problems] if problems is not None else []
    sid = columns["source_id"]
    checks.append(pc.if_else(pc.is_null(sid), pa.scalar("source_id: missing"), pa.scalar(None, pa.string())))
    checks.append(pc.if_else(pc.fill_null(pc.less_equal(sid, 0), False),
                             pa.scalar("source_id: zero or negative, not a Gaia source_id"),
                             pa.scalar(None, pa.string())))
    checks.append(pc.if_else(pc.fill_null(pc.greater_equal(sid, SOURCE_ID_END), False),
                             pa.scalar(f"source_id: at or above {SOURCE_ID_END}, beyond Gaia's range (its "
                                       "HEALPix level-12 index is not one of the 12 * 4^12 pixels)"),
                             pa.scalar(None, pa.string())))
    for name in product.columns:  # inf (or a value beyond float32, read as inf) is never data
        arr = columns.get(name)
        if arr is None:
            continue
        if pa.types.is_floating(arr.type):
            inf = pc.fill_null(pc.is_inf(arr), False)
        elif _is_float_list(arr.type):
            inf = pc.greater(_list_count(arr, lambda v: pc.fill_null(pc.is_inf(v), False)), 0)
        else:
            continue
        checks.append(pc.if_else(inf, pa.scalar(f"{name}: infinite value (inf, or beyond float32)"),
                                 pa.scalar(None, pa.string())))
        if name.endswith(("_error", "_errors")):  # an uncertainty is positive: anything else is damage
            if pa.types.is_floating(arr.type):
                impossible, what = pc.fill_null(pc.less_equal(arr, 0), False), "zero or negative"
            else:  # per pixel or coefficient: negative (a pixel may carry no error: NaN)
                impossible, what = pc.greater(_list_count(arr, lambda v: pc.fill_null(pc.less(v, 0), False)), 0), \
                    "negative value"
            checks.append(pc.if_else(impossible, pa.scalar(f"{name}: {what} (an uncertainty is positive)"),
                                     pa.scalar(None, pa.string())))
    for name, expected in product.lengths:
        arr = columns.get(name)
        if arr is None:
            continue
        length = pc.list_value_length(arr)
        wrong = pc.fill_null(pc.not_equal(length, expected), False)
        msg = pc.binary_join_element_wise(f"{name}: ", pc.cast(length, pa.string()), f" values, expected {expected}", "")
        checks.append(pc.if_else(wrong, msg, pa.scalar(None, pa.string())))
    extra: dict[str, pa.Array] = {}
    if product.table == "rvs":
        flux = columns["flux"]
        n_nan = pc.list_value_length(flux)
        finite_count = _list_count(flux, lambda v: pc.invert(pc.is_nan(v)))
        nan_count = pc.subtract(pc.fill_null(n_nan, 0), finite_count)
        all_nan = pc.fill_null(pc.and_(pc.greater(n_nan, 0), pc.equal(finite_count, 0)), False)
        checks.append(pc.if_else(all_nan, pa.scalar("flux: all NaN"), pa.scalar(None, pa.string())))
        checks.append(pc.if_else(pc.is_null(flux), pa.scalar("flux: missing"), pa.scalar(None, pa.string())))
        extra["n_nan_pixels"] = pc.cast(nan_count, pa.int16())
    if product.table == "xp":
        has_bp = pc.fill_null(pc.greater(pc.list_value_length(columns["bp_coefficients"]), 0), False)
        has_rp = pc.fill_null(pc.greater(pc.list_value_length(columns["rp_coefficients"]), 0), False)
        none = pc.and_(pc.invert(has_bp), pc.invert(has_rp))
        checks.append(pc.if_else(none, pa.scalar("bp_coefficients: neither BP nor RP coefficients"),
                                 pa.scalar(None, pa.string())))
        extra["has_bp"], extra["has_rp"] = has_bp, has_rp
    reason = checks[0]
    for c in checks[1:]:
        reason = pc.coalesce(reason, c)
    bad = pc.is_valid(reason)
    good_mask = pc.invert(bad)
    line_arr = pa.array(lines, pa.int64())
    data = {c: columns[c] if c in columns else pa.nulls(n, product.arrow_type(c)) for c in product.columns}
    data.update(extra)
    data["source_file"] = pa.array([source_file] * n, pa.string())
    data["source_line"] = line_arr
    schema = output_schema(product)
    good = pa.table({f.name: data[f.name].cast(f.type) for f in schema}, schema=schema).filter(good_mask)
    q = quarantine_rows(product.table, source_file, pc.filter(line_arr, bad).to_pylist(),
                        pc.filter(sid, bad).cast(pa.int64()).to_pylist(), pc.filter(reason, bad).to_pylist())
    return good, q


def _is_float_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
        and pa.types.is_floating(t.value_type)


def _list_count(lists: pa.Array, predicate) -> pa.Array:
    """Per-row count of list values satisfying ``predicate`` (vectorised via parent indices)."""
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    hits = predicate(flat).to_numpy(zero_copy_only=False)
    counts = np.bincount(parents[hits], minlength=len(lists)) if len(flat) else np.zeros(len(lists), dtype=np.int64)
    return pa.array(counts.astype(np.int32))


def add_hpx(table: pa.Table, order: int) -> np.ndarray:
    """The HEALPix index at ``order`` of each row's source_id: the partition the row belongs to."""
    sid = table["source_id"].to_numpy()
    return healpix_index(sid, order)
