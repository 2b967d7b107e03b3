"""Readers for every input format, each yielding typed columns, per-row problems and line numbers.

* Gaia bulk / query ECSV (gzip or plain): pyarrow CSV + Arrow kernels, chunked.
* DataLink RVS CSV (one row per pixel): pixels grouped into one spectrum per source.
* DataLink RVS FITS (2401-row table, source in the header).
* XP_CONTINUOUS / gaia_source as CSV (``(...)`` arrays), FITS, VOTable, Parquet.

The unit of accounting is the input row (a line, a FITS row, or, for the
per-pixel RVS CSV, one star); every unit ends in the output or in quarantine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from stellar.ingest.products import Product
from stellar.runtime import available_threads
from stellar.io import gaia_ecsv
from stellar.io.gaia_schema import gaia_table
from stellar.io.text_parse import list_from_numpy, merge_problems, parse_array, parse_scalar


@dataclass(frozen=True)
class InputFile:
    """One discovered input file: path, location-independent name, product, format, size and mtime (the
    reuse fingerprint), the expected md5 and, for labels, the catalogue preset."""

    path: str
    source_file: str  # location-independent name recorded in tables ("gaia:gaia_source/GaiaSource_...csv.gz")
    product: str  # rvs | xp | astrometry | labels
    fmt: str  # ecsv | rvs_pixel_csv | csv | fits | rvs_fits | votable | parquet
    size: int
    mtime_ns: int
    md5: str | None = None  # expected checksum from the folder's _MD5SUM.txt
    catalogue: str | None = None  # label catalogue preset (labels only)


@dataclass
class Batch:
    """Typed columns of some rows of a file, each row's first parse problem (None: no problems) and
    line numbers."""

    columns: dict[str, pa.Array]
    problems: pa.Array | None
    lines: np.ndarray


@dataclass
class ReadResult:
    """What a reader got from a file or chunk: typed batches, rows already quarantined as (line,
    source_id, reason), the rows counted in, notes, provenance, and why the content is corrupt if it is."""

    batches: list[Batch] = field(default_factory=list)
    quarantine: list[tuple[int | None, int | None, str]] = field(default_factory=list)  # (line, source_id, reason)
    rows_in: int = 0
    notes: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    # Why the file's content is known to be wrong somewhere (a gzip CRC-32 mismatch): the run
    # quarantines every row of the file, in every chunk, as for an md5 mismatch.
    corrupt: str | None = None


def md5_of(path: str) -> str:
    """Hex md5 of a file, read in 4 MiB blocks (checked against its folder's ``_MD5SUM.txt``)."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _kind(dtype: str) -> str:
    if dtype.startswith(("int", "uint")):
        return "int"
    if dtype.startswith("float"):
        return "float"
    return dtype


def check_header(header: gaia_ecsv.EcsvHeader, product: Product) -> None:
    """Raise HeaderError unless the header declares the product's required columns and gives every kept
    column the kind (integer, float, array) the Gaia schema has for it."""
    missing = [c for c in product.required if c not in header.names]
    if missing:
        raise gaia_ecsv.HeaderError(f"header does not declare required column(s) {missing}")
    schema = gaia_table(product.gaia_table)
    for name in product.columns:
        if name not in header.names:
            continue
        declared, subtype = header.datatype(name)
        expected = schema.column(name)
        if expected.is_array:
            if declared != "string" or not subtype or "[" not in subtype:
                raise gaia_ecsv.HeaderError(f"header declares {name} as {declared}, expected an array (string + subtype)")
            if _kind(subtype.split("[")[0]) != _kind(expected.subtype.split("[")[0]):
                raise gaia_ecsv.HeaderError(f"header declares {name} with subtype {subtype}, expected {expected.subtype}")
        elif _kind(declared) != _kind(expected.datatype):
            raise gaia_ecsv.HeaderError(f"header declares {name} as {declared}, expected {expected.datatype}")


def typed_from_text(table: pa.Table, product: Product, threads: int | None = None) -> tuple[dict[str, pa.Array], pa.Array]:
    """Convert each text column; array columns (the expensive part) in parallel threads when this
    process has more than one CPU (Arrow kernels release the GIL). A Spark task uses its own
    ``spark.task.cpus``, so tasks never oversubscribe their executor."""
    names = [n for n in product.columns if n in table.column_names]

    def convert(name: str):
        text = table[name].combine_chunks() if table.num_rows else pa.array([], pa.string())
        target = product.arrow_type(name)
        if pa.types.is_list(target):
            return parse_array(text, target.value_type, name)
        return parse_scalar(text, target, name)

    threads = available_threads() if threads is None else threads
    arrays = [n for n in names if pa.types.is_list(product.arrow_type(n))]
    if threads > 1 and len(arrays) > 1 and table.num_rows:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(threads, len(arrays))) as pool:
            done = dict(zip(arrays, pool.map(convert, arrays)))
    else:
        done = {}
    columns: dict[str, pa.Array] = {}
    problems = []
    for name in names:
        values, prob = done[name] if name in done else convert(name)
        columns[name] = values
        problems.append(prob)
    return columns, merge_problems(*problems) if problems else None


def read_ecsv(inp: InputFile, product: Product, start: int = 0, end: int | None = None) -> ReadResult:
    """The rows of a Gaia ECSV file (gzip or plain) that start in uncompressed bytes [start, end), typed.

    A header that cannot be used sends every data line to quarantine (counted by the chunk at 0); gzip
    damage keeps the complete lines before it and counts the cut or lost lines as quarantined rows.
    Provenance records the header's meta and the solution ids seen."""
    res = ReadResult()
    try:
        header = gaia_ecsv.read_header(inp.path)
        check_header(header, product)
    except (gaia_ecsv.HeaderError, OSError, EOFError, UnicodeDecodeError) as exc:
        # Nothing in the file can be trusted: every data line goes to quarantine (counted by lines).
        if start == 0:
            data_lines = _data_line_numbers(inp.path)
            reason = f"header: {exc}"
            res.quarantine = [(ln, None, reason) for ln in data_lines] or [(None, None, reason)]
            res.rows_in = max(1, len(data_lines))
        return res
    if start == 0:
        res.provenance = {"ecsv_meta": header.meta}
        absent = [c for c in product.columns if c not in header.names]
        if absent:  # optional columns the file does not have: null in the table, said in the summary
            res.notes.append(f"optional columns absent (null): {', '.join(absent)}")
    include = [c for c in product.columns if c in header.names]
    solutions: set = set()
    for chunk in gaia_ecsv.iter_chunks(inp.path, header, start, end):
        if chunk.note:
            res.notes.append(chunk.note)
        if chunk.damage:
            res.notes.append(f"{chunk.damage} (after line {chunk.first_line - 1})")
            if chunk.partial_line is not None:
                res.quarantine.append((chunk.first_line, None, f"truncated: incomplete last line ({chunk.damage})"))
                res.rows_in += 1
            if chunk.lost_lines:  # undecodable: counted (estimated), not located
                res.quarantine += [(None, None, f"lost: one of ~{chunk.lost_lines} lines after line "
                                                f"{chunk.first_line - 1} that could not be decoded ({chunk.damage})")
                                   ] * chunk.lost_lines
                res.rows_in += chunk.lost_lines
            if chunk.corrupt:  # every line was read, but the stream's checksum says some are wrong
                res.corrupt = chunk.damage
        if chunk.damage or chunk.note:
            continue
        table, lines, bad, notes = gaia_ecsv.parse_text_table(chunk, header.names, include)
        res.rows_in += len(lines) + len(bad)  # rows, not lines: a row cut by a newline is one
        res.notes += notes
        res.quarantine += [(ln, None, reason) for ln, reason in bad]
        columns, problems = typed_from_text(table, product)
        res.batches.append(Batch(columns, problems, lines))
        if "solution_id" in columns and len(columns["solution_id"]):
            solutions.update(pc.unique(columns["solution_id"].drop_null()).to_pylist())
    if solutions:
        res.provenance["solution_ids"] = sorted(solutions)
    return res


def _data_line_numbers(path: str) -> list[int]:
    """Line numbers of the data lines of a file whose header cannot be used (rare, slow path)."""
    numbers: list[int] = []
    seen_names = False
    try:
        with gaia_ecsv.open_file(path) as fh:
            for i, line in enumerate(fh, start=1):
                if line.startswith(b"#"):
                    continue
                if not seen_names:
                    seen_names = True
                    continue
                numbers.append(i)
    except (OSError, EOFError, ValueError):
        pass
    return numbers


def _table_from_astropy(path: str, fmt: str):
    """FITS/VOTable as an astropy Table whose column names are lower-case (Gaia's own names)."""
    from astropy.table import Table

    if fmt == "votable":
        t = Table.read(path, format="votable", use_names_over_ids=True)
    else:
        t = Table.read(path, format="fits")
    for name in list(t.colnames):
        if name != name.lower() and name.lower() not in t.colnames:
            t.rename_column(name, name.lower())
    return t


def _typed_from_astropy(t, product: Product) -> tuple[dict[str, pa.Array], pa.Array | None]:
    cols: dict[str, pa.Array] = {}
    for name in product.columns:
        if name not in t.colnames:
            continue
        target = product.arrow_type(name)
        col = t[name]
        if pa.types.is_list(target):
            rows = [None if (np.ma.is_masked(v) or v is None) else np.ma.filled(np.asarray(v, dtype=float), np.nan)
                    for v in col]
            cols[name] = list_from_numpy(rows, target.value_type)
        else:
            data = np.ma.getdata(col)
            mask = np.ma.getmaskarray(col)
            cols[name] = pa.array(np.asarray(data).astype(target.to_pandas_dtype()), mask=mask, type=target)
    return cols, None


def _lacks_required(res: ReadResult, product: Product, columns: list[str], n_rows: int) -> bool:
    """A file without a column the product requires cannot give one usable row: ``res`` becomes one
    quarantine row that names the columns and counts the file's rows (True), else nothing changes."""
    missing = [c for c in product.required if c not in columns]
    if missing:
        res.quarantine = [(None, None, f"header: file lacks required column(s) {missing} ({n_rows} rows)")]
        res.rows_in = 1
    return bool(missing)


def read_table_file(inp: InputFile, product: Product) -> ReadResult:
    """XP / gaia_source as FITS, VOTable, CSV or Parquet (DataLink and query products)."""
    res = ReadResult()
    if inp.fmt in ("fits", "votable"):
        t = _table_from_astropy(inp.path, inp.fmt)
        if _lacks_required(res, product, t.colnames, len(t)):
            return res
        cols, problems = _typed_from_astropy(t, product)
        lines = np.arange(1, len(t) + 1, dtype=np.int64)
    else:
        if inp.fmt == "parquet":
            import pyarrow.parquet as pq

            raw = pq.read_table(inp.path)
            text = pa.table({c: (raw[c].cast(pa.string()) if raw[c].type != pa.string() else raw[c])
                             for c in raw.column_names})
            lines = np.arange(1, raw.num_rows + 1, dtype=np.int64)
        else:
            text = pacsv.read_csv(inp.path, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in gaia_table(product.gaia_table).names},
                strings_can_be_null=False, quoted_strings_can_be_null=False))
            lines = np.arange(2, text.num_rows + 2, dtype=np.int64)  # line 1 is the header
        if _lacks_required(res, product, text.column_names, text.num_rows):
            return res
        cols, problems = typed_from_text(text, product)
    res.rows_in = len(lines)
    res.batches.append(Batch(cols, problems, lines))
    return res


def read_rvs_pixel_csv(inp: InputFile, product: Product, wave: np.ndarray) -> ReadResult:
    """DataLink RVS CSV: one line per pixel -> one spectrum per source_id."""
    res = ReadResult()
    text = pacsv.read_csv(inp.path, convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in ("source_id", "solution_id", "ra", "dec", "wavelength", "flux",
                                               "flux_error", "combined_transits", "combined_ccds", "deblended_ccds")},
        strings_can_be_null=False))
    line_no = np.arange(2, text.num_rows + 2, dtype=np.int64)
    sid, p_sid = parse_scalar(text["source_id"].combine_chunks(), pa.int64(), "source_id")
    bad_sid = pc.is_valid(p_sid).to_numpy(zero_copy_only=False) | pc.is_null(sid).to_numpy(zero_copy_only=False)
    for ln in line_no[bad_sid]:
        res.quarantine.append((int(ln), None, "source_id: unparseable in pixel line"))
    keep = ~bad_sid
    sid_np = sid.to_numpy(zero_copy_only=False)[keep].astype(np.int64)
    w, p_w = parse_scalar(text["wavelength"].combine_chunks().filter(pa.array(keep)), pa.float64(), "wavelength")
    f, p_f = parse_scalar(text["flux"].combine_chunks().filter(pa.array(keep)), pa.float32(), "flux")
    e, p_e = parse_scalar(text["flux_error"].combine_chunks().filter(pa.array(keep)), pa.float32(), "flux_error")
    prob = merge_problems(p_w, p_f, p_e)
    w_np = pc.fill_null(w, np.nan).to_numpy(zero_copy_only=False)
    order = np.lexsort((w_np, sid_np))
    sid_s, lines_s = sid_np[order], line_no[keep][order]
    uniq, first, counts = np.unique(sid_s, return_index=True, return_counts=True)
    res.rows_in = len(uniq) + int(bad_sid.sum())
    npx = wave.size
    ok_count = counts == npx
    prob_s = prob.take(pa.array(order)).to_numpy(zero_copy_only=False)
    has_prob = np.array([p is not None for p in prob_s])
    group_prob = np.add.reduceat(has_prob.astype(int), first) > 0 if len(first) else np.zeros(0, bool)
    w_s = w_np[order]
    good_groups = []
    for g, (s, i0, c) in enumerate(zip(uniq, first, counts)):  # per star, not per pixel
        if not ok_count[g]:
            res.quarantine.append((int(lines_s[i0]), int(s), f"flux: {c} pixel lines, expected {npx}"))
        elif group_prob[g]:
            j = i0 + int(np.argmax(has_prob[i0:i0 + c]))
            res.quarantine.append((int(lines_s[j]), int(s), f"{prob_s[j]} (pixel line {int(lines_s[j])})"))
        elif not np.allclose(w_s[i0:i0 + c], wave, atol=1e-4):
            res.quarantine.append((int(lines_s[i0]), int(s), "wavelength: grid does not match the instrument's"))
        else:
            good_groups.append(g)
    idx = np.array(good_groups, dtype=np.int64)
    starts = first[idx]
    pix = (starts[:, None] + np.arange(npx)[None, :]).ravel()
    f_s = pc.fill_null(f, np.nan).to_numpy(zero_copy_only=False)[order]
    e_s = pc.fill_null(e, np.nan).to_numpy(zero_copy_only=False)[order]
    offsets = pa.array(np.arange(len(idx) + 1, dtype=np.int32) * npx)
    cols: dict[str, pa.Array] = {
        "source_id": pa.array(uniq[idx]),
        "flux": pa.ListArray.from_arrays(offsets, pa.array(f_s[pix].astype(np.float32))),
        "flux_error": pa.ListArray.from_arrays(offsets, pa.array(e_s[pix].astype(np.float32))),
    }
    first_rows = pa.array(np.flatnonzero(keep)[order][starts])
    for name in ("solution_id", "ra", "dec", "combined_transits", "combined_ccds", "deblended_ccds"):
        if name in text.column_names:
            vals, _ = parse_scalar(text[name].combine_chunks().take(first_rows), product.arrow_type(name), name)
            cols[name] = vals
    res.batches.append(Batch(cols, None, lines_s[starts]))
    return res


def read_rvs_fits(inp: InputFile, product: Product, wave: np.ndarray) -> ReadResult:
    """DataLink RVS FITS: a 2401-row (wavelength, flux, flux_error) table, the source in the header."""
    from astropy.io import fits

    res = ReadResult(rows_in=1)
    with fits.open(inp.path) as hdul:
        hdr = hdul[1].header
        data = hdul[1].data
        try:
            sid = int(str(hdr.get("SOURCEID", "")).strip())
        except ValueError:
            res.quarantine.append((None, None, "source_id: no SOURCEID in the FITS header"))
            return res
        if data is None or len(data) != wave.size:
            res.quarantine.append((None, sid, f"flux: {0 if data is None else len(data)} rows, expected {wave.size}"))
            return res
        if not np.allclose(np.asarray(data["wavelength"], dtype=float), wave, atol=1e-4):
            res.quarantine.append((None, sid, "wavelength: grid does not match the instrument's"))
            return res
        flux = np.asarray(data["flux"], dtype=np.float32)
        err = np.asarray(data["flux_error"], dtype=np.float32)
        pos = str(hdr.get("POS", "")).strip("() ").split(",")
        ra, dec = (float(pos[0]), float(pos[1])) if len(pos) == 2 else (np.nan, np.nan)

        def _int(key):
            try:
                return int(str(hdr.get(key, "")).strip())
            except ValueError:
                return None

        offsets = pa.array([0, wave.size], pa.int32())
        cols = {
            "source_id": pa.array([sid], pa.int64()),
            "solution_id": pa.array([_int("SOLUTION")], pa.int64()),
            "ra": pa.array([ra]), "dec": pa.array([dec]),
            "flux": pa.ListArray.from_arrays(offsets, pa.array(flux)),
            "flux_error": pa.ListArray.from_arrays(offsets, pa.array(err)),
            "combined_transits": pa.array([_int("NTRANSIT")], pa.int16()),
            "combined_ccds": pa.array([_int("NCCDS")], pa.int16()),
            "deblended_ccds": pa.array([_int("NDEBLEND")], pa.int16()),
        }
    res.batches.append(Batch(cols, None, np.array([1], dtype=np.int64)))
    return res


def read_spectra_fits(inp: InputFile, product: Product, wave: np.ndarray) -> ReadResult:
    """Spectra of a non-Gaia instrument: a SPECTRA table (source_id, flux[n], flux_error[n]) and a
    WAVELENGTH image, as ``stellar synth`` writes them."""
    from astropy.io import fits

    res = ReadResult()
    with fits.open(inp.path, memmap=False) as hdul:
        names = [h.name for h in hdul]
        if "SPECTRA" not in names or "WAVELENGTH" not in names:
            res.quarantine = [(None, None, "header: no SPECTRA table / WAVELENGTH image")]
            res.rows_in = 1
            return res
        data = hdul["SPECTRA"].data
        grid = np.asarray(hdul["WAVELENGTH"].data, dtype=float)
        n = len(data)
        res.rows_in = n
        if grid.shape != wave.shape or not np.allclose(grid, wave, atol=1e-4):
            res.quarantine = [(i + 1, int(s), "wavelength: grid does not match the instrument's")
                              for i, s in enumerate(np.asarray(data["source_id"]))]
            return res
        flux = np.asarray(data["flux"], dtype=np.float32).reshape(n, -1)
        err = np.asarray(data["flux_error"], dtype=np.float32).reshape(n, -1)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * flux.shape[1])
        cols = {"source_id": pa.array(np.asarray(data["source_id"], dtype=np.int64)),
                "flux": pa.ListArray.from_arrays(offsets, pa.array(flux.ravel())),
                "flux_error": pa.ListArray.from_arrays(offsets, pa.array(err.ravel()))}
    res.batches.append(Batch(cols, None, np.arange(1, n + 1, dtype=np.int64)))
    return res


def sniff_csv_columns(path: str) -> list[str]:
    """The column names on a CSV file's first line (gzip or plain): how :func:`sniff` tells its product."""
    opener = gaia_ecsv.open_file(path)
    with opener as fh:
        first = fh.readline().decode("utf-8", "replace").strip()
    return [c.strip().strip('"') for c in first.split(",")] if first else []


def sniff(path: Path) -> tuple[str, str] | None:
    """(product, format) of a DataLink / query product file, from its name and columns."""
    name = path.name.lower()
    suffix = "".join(path.suffixes[-2:]).lower() if name.endswith(".gz") else path.suffix.lower()
    if name.startswith(("xp_sampled", "mcmc_", "epoch_photometry")):
        return None  # DataLink products the model does not read (XP_SAMPLED has wavelength + flux, not RVS)
    if suffix in (".csv", ".csv.gz"):
        cols = sniff_csv_columns(str(path))
        if cols and cols[0].startswith("# %ECSV"):  # a bulk file: ECSV inside a .csv.gz name
            suffix = ".ecsv"
    if suffix in (".csv", ".csv.gz"):
        if "wavelength" in cols and "flux" in cols:
            return "rvs", "rvs_pixel_csv"
        if "bp_coefficients" in cols:
            return "xp", "csv"
        if "parallax" in cols and "source_id" in cols:
            return "astrometry", "csv"
        return None
    if suffix in (".ecsv", ".ecsv.gz"):
        try:
            names = gaia_ecsv.read_header(path).names
        except (gaia_ecsv.HeaderError, OSError):
            return ("xp", "ecsv") if "xp_continuous" in name else None
        if "flux" in names:
            return "rvs", "ecsv"
        if "bp_coefficients" in names:
            return "xp", "ecsv"
        if "parallax" in names:
            return "astrometry", "ecsv"
        return None
    if suffix in (".fits", ".fit"):
        if name.startswith("rvs"):
            return "rvs", "rvs_fits"
        from astropy.io import fits

        with fits.open(path) as hdul:
            cols = [c.lower() for c in hdul[1].columns.names] if len(hdul) > 1 else []
        if "bp_coefficients" in cols:  # (wavelength + flux alone is not RVS: XP_SAMPLED has them too)
            return "xp", "fits"
        return None
    if suffix in (".xml", ".vot"):
        if "xp_continuous" in name or name.startswith("xp_continuous"):
            return "xp", "votable"
        from astropy.table import Table

        try:
            cols = Table.read(path, format="votable").colnames
        except Exception:  # noqa: BLE001 - not a VOTable we understand
            return None
        if "bp_coefficients" in cols:
            return "xp", "votable"
        if "parallax" in cols:
            return "astrometry", "votable"
        return None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        cols = pq.read_schema(path).names
        if "bp_coefficients" in cols:
            return "xp", "parquet"
        if "parallax" in cols and "source_id" in cols:
            return "astrometry", "parquet"
    return None
