"""Label catalogues (APOGEE allStar, GALAH, ...) to the canonical ``labels`` table.

A catalogue preset (``conf/catalogues/<name>.yaml``) maps the catalogue's
columns to stellar's canonical label, error, S/N and flag names, so another
survey plugs in with a YAML file. Columns are matched case-insensitively;
labels the catalogue lacks are null. Rows without a valid Gaia source_id go
to quarantine; label values are kept as they are (quality cuts are the
preprocess stage's, driven by configuration).
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
from pydantic import Field

from stellar.config import StrictModel, load_preset
from stellar.ingest.readers import Batch, InputFile, ReadResult
from stellar.instruments import KNOWN_LABELS

FLAG_NAMES = ("aspcapflag", "starflag", "extratarg", "flag_sp")


class CataloguePreset(StrictModel):
    name: str
    source_id: str
    catalogue_id: str | None = None
    labels: dict[str, str] = Field(min_length=1)
    errors: dict[str, str] = Field(default_factory=dict)
    snr: str | None = None
    flags: dict[str, str] = Field(default_factory=dict)

    def model_post_init(self, _ctx) -> None:
        bad = [k for k in list(self.labels) + list(self.errors) if k not in KNOWN_LABELS]
        bad += [k for k in self.flags if k not in FLAG_NAMES]
        if bad:
            raise ValueError(f"unknown canonical names {bad}; labels: {list(KNOWN_LABELS)}, flags: {list(FLAG_NAMES)}")


def load_catalogue(name: str, conf_dir: str | None = None) -> CataloguePreset:
    return load_preset("catalogues", name, CataloguePreset, conf_dir, "label catalogue")


def labels_schema() -> pa.Schema:
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


def read_label_fits(inp: InputFile, preset: CataloguePreset, required: tuple[str, ...] = ()) -> ReadResult:
    """A label catalogue's rows in the canonical columns. ``required``: the canonical labels the run
    needs (the instrument's); a catalogue without a column its preset maps for one of them is
    unreadable (:class:`UnreadableInput`), not a table of nulls."""
    from astropy.io import fits

    res = ReadResult()
    with fits.open(inp.path, memmap=False) as hdul:
        data = hdul[1].data
        lower = {c.lower(): c for c in hdul[1].columns.names}
        n = 0 if data is None else len(data)
        res.rows_in = n

        def col(name: str | None):
            if name is None:
                return None
            real = lower.get(name.lower())
            return None if real is None else np.asarray(data[real])

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
