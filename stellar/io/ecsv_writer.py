"""Write tables the way the Gaia archive writes its bulk files: gzip ECSV 1.0.

A YAML header declares every column (arrays as ``datatype: string`` with a
``subtype``), then CSV rows with ``null`` for missing values and arrays as
quoted ``"[v1,v2,...]"`` text (``null`` for NaN elements). Formatting is done
column-wise with Arrow compute kernels, never value by value in Python, and
the gzip stream (ISA-L, standard gzip) has a zero timestamp and no file name so that the same input
gives byte-identical files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from isal import igzip

from stellar.io.gaia_schema import GaiaTable

NULL = "null"
ROWS_PER_CHUNK = 256


def ecsv_header(table: GaiaTable, meta: Mapping | None = None) -> str:
    """The ``# %ECSV 1.0`` YAML header declaring every column of ``table`` (and ``meta``), as the Gaia
    archive writes it."""
    doc: dict = {"delimiter": ",", "datatype": [c.header_entry() for c in table.columns]}
    if meta:
        doc["meta"] = dict(meta)
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1000, allow_unicode=True)
    lines = ["# %ECSV 1.0", "# ---"] + [f"# {ln}" if ln else "#" for ln in body.rstrip("\n").split("\n")]
    return "\n".join(lines) + "\n"


def _nan_to_null(values: pa.Array) -> pa.Array:
    if pa.types.is_floating(values.type):
        return pc.if_else(pc.is_nan(values), pa.scalar(None, values.type), values)
    return values


def _scalar_text(arr: pa.Array) -> pa.Array:
    if pa.types.is_boolean(arr.type):
        text = pc.if_else(arr, "True", "False")
    elif pa.types.is_string(arr.type):
        text = arr
    else:
        text = pc.cast(_nan_to_null(arr), pa.string())
    return pc.fill_null(text, NULL)


def _array_text(arr: pa.Array) -> pa.Array:
    """list<float> -> '"[v1,v2,...]"' with null elements as 'null'; a null list -> 'null'."""
    arr = arr.cast(pa.list_(arr.type.value_type)) if pa.types.is_large_list(arr.type) else arr
    offsets = arr.offsets
    values = arr.values
    start = offsets[0].as_py()
    values = values.slice(start, offsets[-1].as_py() - start)
    text_values = pc.fill_null(pc.cast(_nan_to_null(values), pa.string()), NULL)
    rel = pc.subtract(offsets, pa.scalar(start, offsets.type))
    listed = pa.ListArray.from_arrays(rel, text_values)
    joined = pc.binary_join(listed, ",")
    quoted = pc.binary_join_element_wise('"[', joined, ']"', "")
    return pc.if_else(arr.is_null(), pa.scalar(NULL), quoted)


def format_rows(table: GaiaTable, columns: Mapping[str, pa.Array], n_rows: int) -> bytes:
    """CSV text of ``n_rows`` rows; columns not given are written as null."""
    parts = []
    for col in table.columns:
        arr = columns.get(col.name)
        if arr is None:
            parts.append(pa.array([NULL] * n_rows, pa.string()))
            continue
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if len(arr) != n_rows:
            raise ValueError(f"column {col.name}: {len(arr)} values for {n_rows} rows")
        parts.append(_array_text(arr) if col.is_array else _scalar_text(arr))
    lines = pc.binary_join_element_wise(*parts, ",")
    out = pc.binary_join_element_wise(lines, "\n", "")
    offsets = np.frombuffer(out.buffers()[1], dtype=np.int32, count=len(out) + 1, offset=out.offset * 4)
    data = out.buffers()[2]
    return data.to_pybytes()[offsets[0] : offsets[-1]]


def write_ecsv_gz(path: str | os.PathLike, table: GaiaTable, columns: Mapping[str, pa.Array], n_rows: int,
                  meta: Mapping | None = None, level: int = 1) -> int:
    """Write atomically (temp file + rename); returns the number of bytes written.

    Compression is gzip by ISA-L (``isal``), about 3x faster than zlib at the
    same ratio; ``level`` is ISA-L's 0-3.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    header = ecsv_header(table, meta).encode()
    names_line = (",".join(table.names) + "\n").encode()
    try:
        with open(tmp, "wb") as raw:
            with igzip.IGzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0) as gz:
                gz.write(header)
                gz.write(names_line)
                for lo in range(0, n_rows, ROWS_PER_CHUNK):
                    hi = min(n_rows, lo + ROWS_PER_CHUNK)
                    chunk = {k: v.slice(lo, hi - lo) for k, v in columns.items()}
                    gz.write(format_rows(table, chunk, hi - lo))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size
