"""Predictions to files TOPCAT users open: FITS and VOTable (astropy, with units), and CSV.

FITS and VOTable are written whole from memory, so they are for selections
(``--where``) and catalogues up to ``max_rows``; CSV streams batch by batch
(pyarrow) and has no size limit.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

from stellar.errors import StellarError
from stellar.tables import TableStore

# Column descriptions (VOTable DESCRIPTION; astropy keeps them in the table, FITS gets the ood_reason bits as COMMENT cards).
DESCRIPTIONS = {
    "ood": "true: unlike the training set by at least one test (ood_reason says which)",
    "ood_reason": "bitmask of the out-of-distribution tests that flag the star (bits in the header comments)",
    "train_like": "the selection map's verdict: among training stars on the t-SNE map",
    "selection_score": "share of training stars among the map neighbours, relative to the fit set's",
    "spectrum_chi2": "reduced chi2 of the spectrum against the emulator at the predicted labels",
    "line_chi2": "reduced chi2 over the strongest lines' windows (Ca II triplet for RVS)",
    "out_of_range": "bit i: label i outside the training labels' range",
    "quality": "input quality bits (missing blocks, masked pixels)",
    "problem": "why the row got no prediction (empty: it did)",
}

UNITS = {"teff": "K", "logg": "dex", "m_h": "dex", "alpha_m": "dex", "fe_h": "dex", "a_li": "dex"}
FORMATS = {"fits": "fits", "votable": "votable", "csv": "csv"}
DEFAULT_MAX_ROWS = 5_000_000


class ExportError(StellarError):
    """An export the user can fix: unknown format, existing output, a bad ``--where`` term, too many rows
    for FITS/VOTable, an unwritable path."""
    pass


def _filter(where: str | None):
    """A small, safe filter language: 'train_like', 'good' (no problem, not ood), 'model_version=3', 'hpx=17'."""
    if not where:
        return None
    expr = None
    for term in (t.strip() for t in where.split(",") if t.strip()):
        if term == "train_like":
            e = pc.field("train_like") == True  # noqa: E712 - an Arrow expression
        elif term == "good":
            # labels with no problem that no out-of-distribution test flags (stellar.trust)
            e = pc.field("problem").is_null() & (pc.field("ood") == False)  # noqa: E712
        elif "=" in term:
            key, _, value = term.partition("=")
            if key not in ("hpx", "model_version", "split"):
                raise ExportError(f"--where: cannot filter on {key!r} (hpx, model_version, split)")
            if key != "split" and not value.strip().lstrip("+-").isdigit():
                raise ExportError(f"--where: {key} takes a whole number, got {value!r}")
            e = pc.field(key) == (value if key == "split" else int(value))
        else:
            raise ExportError(f"--where: unknown term {term!r} (train_like, good, hpx=N, model_version=N, split=S)")
        expr = e if expr is None else expr & e
    return expr


def export(predictions_root: str, output: str, fmt: str | None = None, where: str | None = None,
           max_rows: int = DEFAULT_MAX_ROWS, overwrite: bool = False) -> dict:
    """Write the committed predictions, filtered by ``where``, to ``output`` in ``fmt`` (by default
    the one its suffix names).

    The file is written beside the target and renamed into place, so the requested name never holds a
    half-written file. Returns the rows written, the path, the format and the model from the manifest."""
    out = Path(output)
    fmt = fmt or {".fits": "fits", ".fit": "fits", ".vot": "votable", ".xml": "votable", ".csv": "csv"}.get(
        "".join(out.suffixes[-1:]).lower())
    if fmt not in FORMATS:
        raise ExportError(f"cannot tell the format of {output}: give --format fits|votable|csv")
    if out.is_dir():
        raise ExportError(f"{output} is a directory: give a file name (e.g. {out / ('predictions.' + fmt)})")
    if out.exists() and not overwrite:
        raise ExportError(f"{output} exists (use --overwrite)")
    store = TableStore(predictions_root)
    man = store.current_manifest()
    if man is None:
        raise ExportError(f"no predictions under {predictions_root} (run 'stellar predict' first)")
    dataset = ds.dataset(store.table_path("predictions"), format="parquet", partitioning="hive")
    flt = _filter(where)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = _write(dataset, flt, fmt, tmp, man, max_rows)
        os.replace(tmp, out)
    except OSError as exc:  # a read-only or vanished folder, a full disk: one line naming the path
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
    return {"rows": rows, "path": str(out), "format": fmt, "model": man.get("model")}


def _write(dataset, flt, fmt: str, tmp: Path, man: dict, max_rows: int) -> int:
    """The filtered predictions into ``tmp`` in ``fmt``; returns the row count."""
    if fmt == "csv":
        rows = 0
        writer = None
        for batch in dataset.to_batches(filter=flt):
            batch = _plain(pa.Table.from_batches([batch]))
            if writer is None:
                writer = pacsv.CSVWriter(str(tmp), batch.schema)
            writer.write_table(batch)
            rows += batch.num_rows
        if writer is None:
            pacsv.write_csv(_plain(dataset.schema.empty_table()), str(tmp))
        else:
            writer.close()
    else:
        n = dataset.count_rows(filter=flt)
        if n > max_rows:
            raise ExportError(f"{n} rows is more than {max_rows} for {fmt} (held in memory): narrow it with --where "
                              "or write CSV")
        table = _plain(dataset.to_table(filter=flt))
        rows = table.num_rows
        _astropy(table, man, fmt, tmp)
    return rows


def _plain(table: pa.Table) -> pa.Table:
    """Dictionary columns as plain strings (CSV/astropy want plain types)."""
    cols = [c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in table.columns]
    return pa.table(cols, names=table.column_names)


def _astropy(table: pa.Table, manifest: dict, fmt: str, path: Path) -> None:
    from astropy.table import Table

    t = Table()
    for name in table.column_names:
        col = table[name]
        if pa.types.is_string(col.type):
            t[name] = col.fill_null("").to_numpy(zero_copy_only=False).astype(str)
        elif pa.types.is_boolean(col.type):
            # FITS/VOTable booleans have no null: unknown train-like reads as False, with 'has_selection'
            t[name] = col.fill_null(False).to_numpy(zero_copy_only=False)
            if name == "train_like":
                t["has_selection"] = col.is_valid().to_numpy(zero_copy_only=False)
        else:
            t[name] = col.to_numpy(zero_copy_only=False)
        base = name[:-4] if name.endswith("_err") else name
        if base in UNITS:
            t[name].unit = UNITS[base]
    from stellar.trust import OOD_BITS

    for name, text in DESCRIPTIONS.items():
        if name in t.colnames:
            t[name].description = text
    model = manifest.get("model", {})
    t.meta["comments"] = ["ood_reason bits:"] + [f"{bit} {name}: {text}" for name, (bit, text) in OOD_BITS.items()]
    t.meta.update({"ORIGIN": "stellar", "MODEL": model.get("name", ""), "MODELVER": model.get("version", -1),
                   "RUNID": model.get("run_id", ""), "FEATVER": manifest["summary"].get("features_version", "")})
    if fmt == "fits":
        t.write(path, format="fits")
    else:
        t.write(path, format="votable")
