"""Predictions to files TOPCAT users open: FITS and VOTable (astropy), and CSV.

Every format carries the column dictionary (:mod:`stellar.columns`: units in each format's legal
form, UCDs where the format has them, a description of every column, every bit of the bitmask
columns) and the provenance (:func:`provenance`: code version and commit, date, model and its
content digest, the versions and content digests of the tables the rows come from, the label
catalogue and cuts). FITS: ``TUNIT``/``TCOMMn`` per column, provenance keywords with comments, bit
definitions as COMMENT cards, ``DATE`` and ``CHECKSUM``/``DATASUM``. VOTable: version 1.3 (CDS
units, so log g's ``[cm/s2]`` is legal), BINARY2 serialisation, ``unit``/``ucd``/``DESCRIPTION``
per field, provenance as INFO elements. CSV: a JSON sidecar (``<file>.json``) with the dictionary
and the provenance.

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

from stellar import __version__
from stellar.columns import Column, bit_lines, dictionary
from stellar.errors import StellarError
from stellar.tables import TableStore

FORMATS = {"fits": "fits", "votable": "votable", "csv": "csv", "hats": "hats"}
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
           max_rows: int = DEFAULT_MAX_ROWS, overwrite: bool = False, sources: dict[str, str] | None = None,
           hats_max_rows: int | None = None) -> dict:
    """Write the committed predictions, filtered by ``where``, to ``output`` in ``fmt`` (by default
    the one its suffix names). ``sources``: the features and ingested tables stores the rows come from
    (``{"features": root, "tables": root}``, default: beside the predictions), for the provenance.

    ``hats``: ``output`` is a folder, a HATS catalogue with ra/dec joined from the ingested gaia_source
    rows and at most ``hats_max_rows`` rows per leaf (:func:`stellar.hats_catalog.write_hats`).

    The file is written beside the target and renamed into place, so the requested name never holds a
    half-written file. Returns the rows written, the path, the format and the model from the manifest."""
    out = Path(output)
    fmt = fmt or {".fits": "fits", ".fit": "fits", ".vot": "votable", ".xml": "votable", ".csv": "csv",
                  ".hats": "hats"}.get("".join(out.suffixes[-1:]).lower())
    if fmt not in FORMATS:
        raise ExportError(f"cannot tell the format of {output}: give --format fits|votable|csv|hats")
    if fmt == "hats":
        return _export_hats(predictions_root, out, where, overwrite, sources, hats_max_rows)
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
        prov = provenance(predictions_root, man, sources)
        rows = _write(dataset, flt, fmt, tmp, man, max_rows, prov)
        if fmt == "csv":
            _csv_sidecar(out, dataset.schema, man, prov, where)
        os.replace(tmp, out)
    except OSError as exc:  # a read-only or vanished folder, a full disk: one line naming the path
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
    return {"rows": rows, "path": str(out), "format": fmt, "model": man.get("model")}


def _export_hats(predictions_root: str, out: Path, where: str | None, overwrite: bool,
                 sources: dict[str, str] | None, max_rows: int | None) -> dict:
    """The predictions as a HATS catalogue folder (errors as one-line :class:`ExportError`)."""
    from stellar.hats_catalog import DEFAULT_MAX_ROWS as HATS_ROWS
    from stellar.hats_catalog import write_hats

    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: a HATS catalogue is a folder")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (use --overwrite)")
    man = TableStore(predictions_root).current_manifest()
    if man is None:
        raise ExportError(f"no predictions under {predictions_root} (run 'stellar predict' first)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        prov = provenance(predictions_root, man, sources)
        s = write_hats(predictions_root, str(out), where=_filter(where), tables_root=(sources or {}).get("tables"),
                       max_rows=max_rows or HATS_ROWS, provenance=prov, overwrite=overwrite)
    except ValueError as exc:
        raise ExportError(f"cannot write {out}: {exc}") from None
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return {**s, "format": "hats", "model": man.get("model")}


def provenance(predictions_root: str, man: dict, sources: dict[str, str] | None = None) -> dict:
    """Where the rows come from, for every product's header: code, date, the model (name, version, run,
    content digest of its files), the predictions, features, selection and ingested tables versions with
    a content digest of each (:meth:`TableStore.content_digest`), and the label catalogues and cuts the
    model's training stars passed."""
    import datetime
    import json as _json

    from stellar.stage import git_commit

    model = man.get("model") or {}
    summary = man.get("summary", {})
    out = {"stellar_version": __version__, "git_commit": git_commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
           "model_name": model.get("name", ""), "model_version": model.get("version", -1),
           "model_run_id": model.get("run_id", ""), "model_digest": model.get("digest", ""),
           "predictions_version": summary.get("version", ""), "predictions_digest": man.get("settings_digest", ""),
           "features_version": summary.get("features_version", ""),
           "selection_version": summary.get("selection_version") or ""}
    root = Path(predictions_root).parent
    for stage in ("features", "tables"):
        store = TableStore((sources or {}).get(stage) or root / stage)
        m = store.current_manifest()
        if m is None:
            continue
        out[f"{stage}_version"] = store.current_version()
        out[f"{stage}_content"] = store.content_digest()
        if stage == "features":
            cuts = [k.split(":", 1)[1] for k in m["summary"].get("counts", {}) if k.startswith("cut:")]
            out["label_cuts_applied"] = _json.dumps(sorted(cuts))
        if stage == "tables":
            files = m.get("files", {})
            out["label_catalogues"] = ",".join(sorted(k.split(":", 1)[1] for k in files if k.startswith("labels:")))
            out["input_files"] = len(files)
    return out


def _csv_sidecar(out: Path, schema: pa.Schema, man: dict, prov: dict, where: str | None) -> None:
    """``<file>.json`` beside a CSV: the column dictionary (units, UCDs, descriptions, bits) and the provenance."""
    import json as _json

    cols = dictionary(man.get("summary", {}).get("labels", []))
    side = {"file": out.name, "where": where or "", "provenance": prov,
            "columns": [cols[n].as_dict() if n in cols else {"name": n} for n in schema.names]}
    tmp = out.with_name(f".{out.name}.json.tmp-{os.getpid()}")
    tmp.write_text(_json.dumps(side, indent=1, default=str) + "\n")
    os.replace(tmp, out.with_name(out.name + ".json"))


def _write(dataset, flt, fmt: str, tmp: Path, man: dict, max_rows: int, prov: dict) -> int:
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
        _astropy(table, man, fmt, tmp, prov)
    return rows


def _plain(table: pa.Table) -> pa.Table:
    """Dictionary columns as plain strings (CSV/astropy want plain types)."""
    cols = [c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in table.columns]
    return pa.table(cols, names=table.column_names)


def _astropy(table: pa.Table, manifest: dict, fmt: str, path: Path, prov: dict) -> None:
    from astropy.table import Table

    labels = manifest.get("summary", {}).get("labels", [])
    cols = dictionary(labels)
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
    for name in t.colnames:
        c = cols.get(name)
        if c is not None:
            t[name].description = c.description
    if fmt == "fits":
        _fits(t, cols, prov, path)
    else:
        _votable(t, cols, prov, path)


# FITS keyword (8 characters) per provenance entry
FITS_KEYS = {"stellar_version": "STELVER", "git_commit": "GITCOMIT", "date": "DATE", "model_name": "MODEL",
             "model_version": "MODELVER", "model_run_id": "RUNID", "model_digest": "MODELDIG",
             "predictions_version": "PREDVER", "predictions_digest": "PREDDIG", "features_version": "FEATVER",
             "features_content": "FEATDIG", "selection_version": "SELVER", "tables_version": "TABVER",
             "tables_content": "TABDIG", "label_catalogues": "LABCAT", "label_cuts_applied": "LABCUTS",
             "input_files": "NINFILES"}
FITS_COMMENTS = {"STELVER": "stellar version", "GITCOMIT": "git commit of the code", "DATE": "file written (UTC)",
                 "MODEL": "registered model", "MODELVER": "its version", "RUNID": "MLflow run that trained it",
                 "MODELDIG": "content digest of the model files", "PREDVER": "predictions table version",
                 "PREDDIG": "predictions settings digest", "FEATVER": "features table version",
                 "FEATDIG": "content digest of the features parts", "SELVER": "selection table version",
                 "TABVER": "ingested tables version", "TABDIG": "content digest of the ingested parts",
                 "LABCAT": "label catalogues ingested", "LABCUTS": "label cuts that removed stars",
                 "NINFILES": "input files ingested"}


def _fits(t, cols: dict[str, Column], prov: dict, path: Path) -> None:
    """A FITS binary table: TUNIT where FITS has the unit, TCOMMn for every column, provenance keywords
    with comments, the bitmask columns' bits as COMMENT cards, and CHECKSUM/DATASUM."""
    from astropy.io import fits

    for name in t.colnames:
        c = cols.get(name)
        t[name].unit = (c.fits_unit or None) if c is not None else None
    hdu = fits.table_to_hdu(t)
    hdr = hdu.header
    for i, name in enumerate(t.colnames, start=1):
        c = cols.get(name)
        if c is None:
            continue
        unit_note = f"[{c.unit}] " if c.unit and not c.fits_unit else ""
        hdr[f"TCOMM{i}"] = (unit_note + c.description)[:68]
    for key, value in prov.items():
        fkey = FITS_KEYS.get(key)
        if fkey is None:
            continue
        value = value if isinstance(value, (int, float)) else str(value)
        if isinstance(value, str) and len(value) > 68:
            value = value[:65] + "..."
        comment = FITS_COMMENTS[fkey]
        # a card is 80 characters: keyword (8), '= ', the value, ' / ', the comment; shorten the comment
        # to what is left (a long value keeps priority), rather than have astropy warn and cut it
        room = 80 - 10 - (max(len(value.replace("'", "''")) + 2, 20) if isinstance(value, str) else 20) - 3
        hdr[fkey] = (value, comment[:max(room, 0)]) if room > 0 else value
    hdr["ORIGIN"] = ("stellar", "labels from Gaia spectra (hybrid CNN ensemble)")
    for c in cols.values():
        if c.bits and c.name in t.colnames:
            for line in bit_lines(c):
                hdr.add_comment(line)
    for c in cols.values():
        if c.name in t.colnames and c.unit == "dex" and not c.fits_unit:
            hdr.add_comment(f"{c.name}: logarithmic, no FITS unit; dex (log10), see TCOMM")
            break
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, checksum=True)


def _votable(t, cols: dict[str, Column], prov: dict, path: Path) -> None:
    """A VOTable 1.3 (CDS units) in BINARY2 with unit, UCD and DESCRIPTION per field and the provenance
    and bit definitions as INFO elements."""
    from astropy.io.votable.tree import Info, Resource, TableElement, VOTableFile

    for name in t.colnames:
        t[name].unit = None  # set per field below, in the CDS syntax VOTable 1.3 uses
    vot = VOTableFile(version="1.3")
    res = Resource()
    vot.resources.append(res)
    tab = TableElement.from_table(vot, t)
    tab.format = "binary2"
    tab.name = "predictions"
    tab.description = (f"stellar {prov.get('stellar_version', '')} labels by {prov.get('model_name', '')} version "
                       f"{prov.get('model_version', '')} (MLflow run {prov.get('model_run_id', '')}); provenance "
                       "in the INFO elements, bit meanings in the INFO elements named <column>_bit_<value>")
    res.tables.append(tab)
    for f in tab.fields:
        c = cols.get(f.name)
        if c is None:
            continue
        if c.vo_unit:
            f.unit = c.vo_unit
        f.ucd = c.ucd
        f.description = c.description
    for key, value in prov.items():
        tab.infos.append(Info(name=key, value=str(value)))
    for c in cols.values():
        if c.bits and c.name in t.colnames:
            for bit, (name, text) in sorted(c.bits.items()):
                tab.infos.append(Info(name=f"{c.name}_bit_{bit}", value=f"{name}: {text}"))
    vot.to_xml(str(path))
