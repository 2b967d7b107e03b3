"""Label catalogues (APOGEE allStar, GALAH, ...) to the canonical ``labels`` table.

A catalogue preset (``conf/catalogues/<name>.yaml``) maps the catalogue's
columns to stellar's canonical label, error, S/N and flag names, so another
survey plugs in with a YAML file. Columns are matched case-insensitively;
labels the catalogue lacks are null. Rows without a valid Gaia source_id go
to quarantine; label values are kept as they are (quality cuts are the
preprocess stage's, driven by configuration).
"""

from __future__ import annotations


from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from stellar.config import StrictModel, load_preset
from stellar.ingest.readers import Batch, InputFile, ReadResult
from stellar.instruments import KNOWN_LABELS

FLAG_NAMES = ("aspcapflag", "starflag", "extratarg", "flag_sp")


class CataloguePreset(StrictModel):
    """A label catalogue preset (``conf/catalogues/<name>.yaml``): the catalogue's columns of source_id,
    its own row id, the canonical labels, their errors, the S/N and the quality flags."""

    name: str
    source_id: str
    catalogue_id: str | None = None
    labels: dict[str, str] = Field(min_length=1)
    errors: dict[str, str] = Field(default_factory=dict)
    snr: str | None = None
    flags: dict[str, str] = Field(default_factory=dict)

    def model_post_init(self, _ctx) -> None:
        """Refuse canonical label and flag names stellar does not know, so a typo fails on load, not as a
        column of nulls."""
        bad = [k for k in list(self.labels) + list(self.errors) if k not in KNOWN_LABELS]
        bad += [k for k in self.flags if k not in FLAG_NAMES]
        if bad:
            raise ValueError(f"unknown canonical names {bad}; labels: {list(KNOWN_LABELS)}, flags: {list(FLAG_NAMES)}")


def load_catalogue(name: str, conf_dir: str | None = None) -> CataloguePreset:
    """Load and validate a catalogue preset by name or YAML path."""
    return load_preset("catalogues", name, CataloguePreset, conf_dir, "label catalogue")


def labels_schema() -> pa.Schema:
    """The canonical ``labels`` table schema: source_id, catalogue and row id, every known label with its
    error, the label survey's S/N, the flag columns, and the source file and line."""
    fields = [pa.field("source_id", pa.int64()), pa.field("catalogue", pa.string()),
              pa.field("catalogue_id", pa.string())]
    for lab in KNOWN_LABELS:
        fields += [pa.field(lab, pa.float32()), pa.field(f"{lab}_err", pa.float32())]
    fields += [pa.field("snr", pa.float32())] + [pa.field(f, pa.int64()) for f in FLAG_NAMES]
    fields += [pa.field("source_file", pa.string()), pa.field("source_line", pa.int64())]
    return pa.schema(fields)


class UnreadableInput(Exception):
    """A file that holds rows but cannot be read as its kind: ``rows`` is how many it holds."""

    def __init__(self, reason: str, rows: int):
        super().__init__(reason)
        self.rows = rows


def _table_rows(path: str, hdu) -> tuple[dict[str, np.ndarray], int, int]:
    """(column name -> values, rows read, rows its header declares that the file does not hold).

    astropy refuses a table whose data is cut short; its fixed-width rows before the cut are read
    here straight from the bytes (NAXIS1 each, TSCAL/TZERO applied), so a truncated download keeps
    them."""
    names = list(hdu.columns.names)
    try:
        data = hdu.data
        n = 0 if data is None else len(data)
        return ({c: np.asarray(data[c]) for c in names} if n else {}), n, 0
    except (ValueError, OSError, TypeError):
        pass
    declared, width = int(hdu.header["NAXIS2"]), int(hdu.header["NAXIS1"])
    offset = hdu._data_offset  # where its data starts in the file (astropy exposes no public name)
    complete = max(0, min(declared, (Path(path).stat().st_size - offset) // width)) if width else 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        raw = np.frombuffer(fh.read(complete * width), dtype=hdu.columns.dtype.newbyteorder(">"))
    cols = {}
    for c in hdu.columns:
        v = raw[c.name]
        if c.bscale not in (None, 1) or c.bzero not in (None, 0):
            v = v * (1 if c.bscale is None else c.bscale) + (0 if c.bzero is None else c.bzero)
        cols[c.name] = v
    return cols, complete, declared - complete


def read_label_fits(inp: InputFile, preset: CataloguePreset, required: tuple[str, ...] = ()) -> ReadResult:
    """A label catalogue's rows in the canonical columns. ``required``: the canonical labels the run
    needs (the instrument's); a catalogue without a column its preset maps for one of them is
    unreadable (:class:`UnreadableInput`), not a table of nulls."""
    from astropy.io import fits

    res = ReadResult()
    with fits.open(inp.path, memmap=False) as hdul:
        if len(hdul) < 2 or not isinstance(hdul[1], (fits.BinTableHDU, fits.TableHDU)):
            kinds = ", ".join(type(h).__name__ for h in hdul) or "none"
            raise UnreadableInput(f"no table in HDU 1 (HDUs: {kinds})", 0)
        data, n, lost = _table_rows(inp.path, hdul[1])
        lower = {c.lower(): c for c in hdul[1].columns.names}
        res.rows_in = n + lost
        if lost:  # a truncated file: the complete rows are kept, each missing one is quarantined by number
            res.notes.append(f"table data truncated: {n} of {n + lost} rows (NAXIS2) are in the file")
            res.quarantine = [(i, None, f"truncated: row {i} of {n + lost} is not in the file")
                              for i in range(n + 1, n + lost + 1)]

        def col(name: str | None):
            if name is None:
                return None
            real = lower.get(name.lower())
            return None if real is None else (data[real] if n else np.zeros(0))

        sid_raw = col(preset.source_id)
        if sid_raw is None:
            raise UnreadableInput(f"catalogue has no {preset.source_id} column ({n} rows)", n)
        missing = sorted({preset.labels[k] for k in required if preset.labels.get(k) and col(preset.labels[k]) is None})
        if missing:
            raise UnreadableInput(f"catalogue lacks the column{'s' if len(missing) > 1 else ''} "
                                  f"{', '.join(missing)} that preset {preset.name} maps ({n} rows)", n)
        cols: dict[str, pa.Array] = {"source_id": pa.array(sid_raw.astype(np.int64))}
        cols["catalogue"] = pa.array([preset.name] * n, pa.string())
        cid = col(preset.catalogue_id)
        cols["catalogue_id"] = pa.array(np.char.strip(cid.astype(str)) if cid is not None else [None] * n, pa.string())
        for lab in KNOWN_LABELS:
            for key, mapping in ((lab, preset.labels), (f"{lab}_err", preset.errors)):
                v = col(mapping.get(lab))
                cols[key] = pa.array(v.astype(np.float32), type=pa.float32(), from_pandas=True) if v is not None \
                    else pa.nulls(n, pa.float32())
        snr = col(preset.snr)
        cols["snr"] = pa.array(snr.astype(np.float32)) if snr is not None else pa.nulls(n, pa.float32())
        for flag in FLAG_NAMES:
            v = col(preset.flags.get(flag))
            cols[flag] = pa.array(v.astype(np.int64)) if v is not None else pa.nulls(n, pa.int64())
    res.batches.append(Batch(cols, None, np.arange(1, n + 1, dtype=np.int64)))
    return res


def normalise_labels(columns: dict[str, pa.Array], lines: np.ndarray, source_file: str) -> tuple[pa.Table, pa.Table]:
    """One batch of label rows in the canonical schema, split into (good rows, quarantine rows): a row
    without a positive source_id (no Gaia cross-match) goes to quarantine."""
    import pyarrow.compute as pc

    from stellar.ingest.products import quarantine_rows

    n = len(lines)
    schema = labels_schema()
    data = dict(columns)
    data["source_file"] = pa.array([source_file] * n, pa.string())
    data["source_line"] = pa.array(lines, pa.int64())
    table = pa.table({f.name: data[f.name].cast(f.type) for f in schema}, schema=schema)
    sid = table["source_id"]
    bad = pc.fill_null(pc.less_equal(sid, 0), True)
    q = quarantine_rows("labels", source_file, pc.filter(table["source_line"], bad).to_pylist(),
                        [None] * pc.sum(bad.cast(pa.int64())).as_py() if n else [],
                        ["source_id: missing (no Gaia cross-match)"] * (pc.sum(bad.cast(pa.int64())).as_py() or 0))
    return table.filter(pc.invert(bad)), q
