"""The ingest stage: discover inputs, parse them in parallel tasks, deduplicate, account, commit.

Tasks are (file, chunk) pairs; each parses its share, writes its Parquet
parts (one per HEALPix partition) into the new table version and returns
counts. Files unchanged since the committed version (same name, size, mtime
and ingest settings) are not parsed again: their parts are hard-linked into
the new version. Duplicated source_ids (within or across files) are resolved
per HEALPix partition (a source_id fixes its partition): the first occurrence
by (file, line) wins, the others go to quarantine naming the winner. The new
version becomes visible in one atomic pointer switch, only when every task
succeeded and the share of bad rows is under ``max_bad_fraction``.

Restart plan: each finished task leaves a done marker in the uncommitted
version; a run killed mid-way (after hours, on a full catalogue) and started
again with the same inputs and settings carries on in that version, parsing
only the tasks without a marker. Duplicate resolution and accounting, which
are quick, always run whole.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stellar import __version__
from stellar.config import IngestConfig, StellarConfig
from stellar.errors import StellarError
from stellar.healpix import healpix_index
from stellar.runtime import LOCAL, Executor
from stellar.stage import StageResult, StoreRun
from stellar.ingest import labels as label_io
from stellar.ingest.products import (QUARANTINE_SCHEMA, Product, astrometry_product, normalise,
                                     quarantine_rows, rvs_product, xp_product)
from stellar.ingest.readers import (InputFile, ReadResult, md5_of, read_ecsv, read_rvs_fits,
                                    read_rvs_pixel_csv, read_spectra_fits, read_table_file, sniff)
from stellar.instruments import Instrument
from stellar.io.gaia_ecsv import uncompressed_size_hint
from stellar.tables import done_results, mark_done, settings_hash, write_part

TABLES = ("rvs", "xp", "astrometry", "labels")
BULK_LAYOUT = {
    "gaia_source": ("astrometry", "GaiaSource_"),
    "Spectroscopy/rvs_mean_spectrum": ("rvs", "RvsMeanSpectrum_"),
    "Spectroscopy/xp_continuous_mean_spectrum": ("xp", "XpContinuousMeanSpectrum_"),
}


class IngestError(StellarError):
    """An ingest run that cannot go on or commit: no or missing inputs, unreadable files not allowed, too
    many bad rows, or row accounting that does not add up."""
    pass


@dataclass(frozen=True)
class IngestTask:
    """One unit of ingest work: the rows of one input file starting in uncompressed bytes [start, end);
    ``key`` names its parts."""

    input: InputFile
    key: str  # short stable id of the input file (part names)
    chunk: int
    start: int
    end: int | None


def file_key(source_file: str) -> str:
    """A short stable id of an input's location-independent name, used in its part file names."""
    return hashlib.sha1(source_file.encode()).hexdigest()[:12]


def settings_digest(cfg: IngestConfig, instrument: Instrument) -> str:
    """Settings that change what a file's parts contain; a change re-ingests everything."""
    relevant = {"order": cfg.healpix_order, "astrometry": cfg.astrometry_columns,
                "xp_corr": cfg.keep_xp_correlations, "n_pixels": instrument.n_pixels,
                "grid": [instrument.wavelength.start, instrument.wavelength.step], "version": __version__}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


MD5SUM = "_MD5SUM.txt"


def _md5_table(folder: Path) -> dict[str, str] | None:
    """name -> md5 of a bulk folder's ``_MD5SUM.txt``; None where the folder has none."""
    f = folder / MD5SUM
    if not f.is_file():
        return None
    out = {}
    for line in f.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1]] = parts[0]
    return out


def _is_bulk_data(name: str, prefix: str) -> bool:
    """A bulk data file's name (``<prefix>*.csv`` or ``.csv.gz``); a ``.part`` download, an editor's
    copy or a hidden file is not one, even where it starts with the prefix."""
    return name.startswith(prefix) and name.endswith((".csv", ".csv.gz"))


def checksum_listing(cfg: IngestConfig) -> dict[str, list[str]]:
    """What the bulk folders' ``_MD5SUM.txt`` files say against what is on disk (``ingest.verify_md5``):
    folders with data files but no ``_MD5SUM.txt``, files it lists that are not on disk, data files it
    does not list, and the names that were ignored as not data files. Each is a counted problem in the
    run summary and a warning; none is silent."""
    out: dict[str, list[str]] = {"no_md5sum": [], "listed_missing": [], "unlisted": [], "ignored": []}
    if not cfg.gaia_root or not cfg.verify_md5:
        return out
    root = Path(cfg.gaia_root)
    for sub, (_, prefix) in BULK_LAYOUT.items():
        folder = root / sub
        if not folder.is_dir():
            continue
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MD5SUM)
        data = [n for n in names if _is_bulk_data(n, prefix)]
        out["ignored"] += [f"{sub}/{n}" for n in names if n not in data]
        sums = _md5_table(folder)
        if sums is None:
            if data:
                out["no_md5sum"].append(sub)
            continue
        listed = {n for n in sums if _is_bulk_data(n, prefix)}
        out["listed_missing"] += [f"{sub}/{n}" for n in sorted(listed - set(data))]
        out["unlisted"] += [f"{sub}/{n}" for n in data if n not in sums]
    return out


def discover(cfg: IngestConfig, instrument_name: str = "gaia_rvs") -> list[InputFile]:
    """Every input file with its product and format, in a stable order.

    Spectra of a non-Gaia instrument (FITS tables under ``Spectroscopy/<instrument>/``)
    go to the same ``rvs`` table: it holds the configured instrument's spectra.
    """
    found: list[InputFile] = []

    def add(path: Path, source_file: str, product: str, fmt: str, md5=None, catalogue=None):
        st = path.stat()
        found.append(InputFile(str(path), source_file, product, fmt, st.st_size, st.st_mtime_ns, md5, catalogue))

    if cfg.gaia_root:
        root = Path(cfg.gaia_root)
        if not root.is_dir():
            raise IngestError(f"ingest.gaia_root {root} is not a folder")
        for sub, (product, prefix) in BULK_LAYOUT.items():
            folder = root / sub
            if not folder.is_dir():
                continue
            sums = _md5_table(folder) or {}
            for path in sorted(p for p in folder.glob(f"{prefix}*.csv*") if _is_bulk_data(p.name, prefix)):
                add(path, f"gaia:{sub}/{path.name}", product, "ecsv", sums.get(path.name))
        folder = root / "Spectroscopy" / instrument_name
        if instrument_name != "gaia_rvs" and folder.is_dir():
            sums = _md5_table(folder) or {}
            for path in sorted(folder.glob("Spectra_*.fits")):
                add(path, f"gaia:Spectroscopy/{instrument_name}/{path.name}", "rvs", "spectra_fits", sums.get(path.name))
    for entry in cfg.datalink:
        base = Path(entry)
        if not base.exists():
            raise IngestError(f"ingest.datalink entry {base} does not exist")
        paths = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
        for path in paths:
            kind = sniff(path)
            if kind is None:
                continue
            rel = path.relative_to(base).as_posix() if base.is_dir() else path.name
            add(path, f"datalink:{base.name}/{rel}" if base.is_dir() else f"datalink:{rel}", kind[0], kind[1])
    for lab in cfg.labels:
        path = Path(lab.path)
        if not path.is_file():
            raise IngestError(f"label catalogue {path} not found")
        add(path, f"labels:{path.name}", "labels", "fits", catalogue=lab.catalogue)
    return found


MIN_SPLIT_BYTES = 32 << 20


def plan(inputs: list[InputFile], chunk_bytes: int, parallelism: int = 1) -> list[IngestTask]:
    """(file, chunk) tasks. Text files above ``chunk_bytes`` are split, and so are big files when
    there are fewer of them than task slots. A chunk must decompress everything before it (gzip
    cannot seek), so splitting is kept to what the slots need."""
    tasks = []
    sizes = {inp.path: uncompressed_size_hint(inp.path) for inp in inputs if inp.fmt == "ecsv"}
    big = [p for p, size in sizes.items() if size >= MIN_SPLIT_BYTES]
    want = int(np.ceil(parallelism / len(big))) if big else 1
    for inp in inputs:
        key = file_key(inp.source_file)
        if inp.fmt == "ecsv":
            size = sizes[inp.path]
            n = max(1, int(np.ceil(size / chunk_bytes)), want if size >= MIN_SPLIT_BYTES else 1)
            bounds = [size * k // n for k in range(n)] + [None]
            tasks += [IngestTask(inp, key, k, bounds[k], bounds[k + 1]) for k in range(n)]
        else:
            tasks.append(IngestTask(inp, key, 0, 0, None))
    # Largest files first: better packing of tasks on executors.
    return sorted(tasks, key=lambda t: (-t.input.size, t.key, t.chunk))


@dataclass
class TaskContext:
    """What every ingest task needs beside its task: HEALPix order, products, the instrument's wavelength
    grid, conf folder, the version folder being written, md5 mismatches and the labels the run needs."""

    order: int
    products: dict[str, Product]
    wave: np.ndarray
    conf_dir: str | None
    version_dir: str
    # source_file -> why its checksum failed: every row it holds goes to quarantine with that reason
    md5_mismatch: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] = ()  # the canonical labels the run needs from a label catalogue


def _read(task: IngestTask, ctx: TaskContext) -> ReadResult:
    inp = task.input
    if inp.product == "labels":
        return label_io.read_label_fits(inp, label_io.load_catalogue(inp.catalogue, ctx.conf_dir), ctx.labels)
    product = ctx.products[inp.product]
    if inp.fmt == "ecsv":
        return read_ecsv(inp, product, task.start, task.end)
    if inp.fmt == "rvs_pixel_csv":
        return read_rvs_pixel_csv(inp, product, ctx.wave)
    if inp.fmt == "rvs_fits":
        return read_rvs_fits(inp, product, ctx.wave)
    if inp.fmt == "spectra_fits":
        return read_spectra_fits(inp, product, ctx.wave)
    return read_table_file(inp, product)


def _write_partitioned(table: pa.Table, name: str, ctx: TaskContext, key: str, chunk: int, meta: dict) -> list[str]:
    if table.num_rows == 0:
        return []
    sid = table["source_id"].to_numpy(zero_copy_only=False)
    valid = ~pc.is_null(table["source_id"]).to_numpy(zero_copy_only=False)
    hpx = np.full(len(sid), -1, dtype=np.int64)
    hpx[valid] = healpix_index(np.where(valid, sid, 0)[valid].astype(np.int64), ctx.order)
    order = np.argsort(hpx, kind="stable")
    table = table.take(pa.array(order))
    hpx = hpx[order]
    rels = []
    cuts = np.flatnonzero(np.diff(hpx)) + 1
    for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(hpx)]])):
        rel = f"{name}/hpx={int(hpx[lo])}/part-{key}-{chunk:04d}.parquet"
        write_part(Path(ctx.version_dir) / rel, table.slice(lo, hi - lo), meta)
        rels.append(rel)
    return rels


def read_rows(task: IngestTask, ctx: TaskContext) -> tuple[ReadResult, str | None, pa.Table | None, list[pa.Table]]:
    """Read one (file, chunk) into its product's canonical rows: (the reader's result, why the file is
    unreadable or None, the good rows or None, the quarantine tables). What ingest writes, and what
    ``stellar.api`` predicts from a user's files without a run: one reading path for both."""
    inp = task.input
    unreadable = None
    try:
        res = _read(task, ctx)
    except label_io.UnreadableInput as exc:  # its rows are known: one quarantine row each, counts exact
        unreadable = f"file unreadable: {exc}"
        n = max(1, exc.rows)
        res = ReadResult(rows_in=n, quarantine=[(i, None, unreadable) for i in range(1, n + 1)])
    except Exception as exc:  # noqa: BLE001 - the run decides (ingest.allow_unreadable); never a traceback
        unreadable = f"file unreadable: {type(exc).__name__}: {exc}"
        res = ReadResult(rows_in=1, quarantine=[(None, None, unreadable)])
    table_name = inp.product
    goods, quars = [], []
    for b in res.batches:
        if table_name == "labels":
            good, q = label_io.normalise_labels(b.columns, b.lines, inp.source_file)
        else:
            good, q = normalise(ctx.products[table_name], b.columns, b.problems, b.lines, inp.source_file)
        goods.append(good)
        quars.append(q)
    if res.quarantine:
        lines, sids, reasons = zip(*res.quarantine)
        quars.append(quarantine_rows(table_name, inp.source_file, lines, sids, reasons))
    return res, unreadable, (pa.concat_tables(goods) if goods else None), quars


def run_task(task: IngestTask, ctx: TaskContext) -> dict:
    """Parse one (file, chunk), write its parts; returns counts and provenance."""
    t0 = time.perf_counter()
    inp = task.input
    table_name = inp.product
    res, unreadable, good, quars = read_rows(task, ctx)
    notes = list(res.notes)
    meta = {"stellar.table": table_name, "stellar.source_file": inp.source_file,
            "stellar.provenance": json.dumps(res.provenance, sort_keys=True, default=str)}
    corrupt = f"file: {res.corrupt}" if res.corrupt else None
    mismatch = ctx.md5_mismatch.get(inp.source_file) or corrupt
    if mismatch and good is not None and good.num_rows:  # a file that is not what the archive wrote: no row trusted
        quars.append(quarantine_rows(table_name, inp.source_file, good["source_line"].to_pylist(),
                                     good["source_id"].to_pylist(), [mismatch] * good.num_rows))
        good = None
    if mismatch and task.chunk == 0:
        notes.append(f"{mismatch}: its rows are quarantined")
    quar = pa.concat_tables(quars).cast(QUARANTINE_SCHEMA) if quars else QUARANTINE_SCHEMA.empty_table()
    parts = _write_partitioned(good, table_name, ctx, task.key, task.chunk, meta) if good is not None else []
    parts += _write_partitioned(quar, "quarantine", ctx, f"{task.key}", task.chunk,
                                {"stellar.table": "quarantine", "stellar.source_file": inp.source_file})
    result = {"source_file": inp.source_file, "chunk": task.chunk, "rows_in": res.rows_in,
              "written": 0 if good is None else good.num_rows, "quarantined": quar.num_rows, "parts": parts,
              "notes": notes, "provenance": json.loads(json.dumps(res.provenance, default=str)),
              "unreadable": unreadable, "corrupt": corrupt, "seconds": time.perf_counter() - t0}
    mark_done(ctx.version_dir, task_id(task), result)  # its parts are in place: a rerun may skip it
    return result


def _requarantine_corrupt(results: list[dict], tasks: list[IngestTask], ctx: TaskContext, mapper: Executor) -> list[dict]:
    """A gzip file whose checksum fails is found out only by the task that reads to its end; the
    file's other chunks were parsed as good. Those chunks run again with the file marked, so every
    row of the file lands in quarantine with the reason (as for an md5 mismatch)."""
    corrupt = {r["source_file"]: r["corrupt"] for r in results if r.get("corrupt")}
    stale = [r for r in results if r["source_file"] in corrupt and not r.get("corrupt")]
    if not stale:
        return results
    for r in stale:  # the first attempt's parts: replaced below, and must not linger unlisted
        for rel in r["parts"]:
            (Path(ctx.version_dir) / rel).unlink(missing_ok=True)
    again = {(r["source_file"], r["chunk"]) for r in stale}
    redo = [t for t in tasks if (t.input.source_file, t.chunk) in again]
    marked = replace(ctx, md5_mismatch={**ctx.md5_mismatch, **corrupt})
    return [r for r in results if r not in stale] + list(mapper.map(lambda t: run_task(t, marked), redo))


def _allowed(source_file: str, allowed: list[str]) -> bool:
    """Whether ``ingest.allow_unreadable`` names this input: its source_file, or a path or name with
    the same file name."""
    name = Path(source_file.split(":", 1)[-1]).name
    return any(a == source_file or Path(a).name == name for a in allowed)


def task_id(task: IngestTask) -> str:
    """The id of a task's done marker: its file key and chunk number."""
    return f"{task.key}-{task.chunk:04d}"


def dedup_partition(version_dir: str, rel_dir: str) -> dict:
    """Resolve duplicated source_ids inside one table partition (``rvs/hpx=17``).

    Returns the quarantine parts written, as (relative path, source file).
    """
    folder = Path(version_dir) / rel_dir
    parts = sorted(folder.glob("part-*.parquet"))
    frames = [pq.read_table(p, columns=["source_id", "source_file", "source_line"]) for p in parts]
    if not frames:
        return {"quarantine_parts": []}
    sid = np.concatenate([f["source_id"].to_numpy() for f in frames])
    if np.unique(sid).size == sid.size:
        return {"quarantine_parts": []}
    part_idx = np.concatenate([np.full(f.num_rows, i, dtype=np.int32) for i, f in enumerate(frames)])
    files = np.concatenate([np.asarray(f["source_file"].to_pylist(), dtype=object) for f in frames])
    lines = np.concatenate([f["source_line"].to_numpy() for f in frames])
    names, codes = np.unique(files.astype(str), return_inverse=True)
    order = np.lexsort((lines, codes, sid))
    first = np.ones(sid.size, dtype=bool)
    first[1:] = sid[order][1:] != sid[order][:-1]
    loser = np.zeros(sid.size, dtype=bool)
    loser[order[~first]] = True
    winner = np.empty(sid.size, dtype=np.int64)
    group_start = np.maximum.accumulate(np.where(first, np.arange(sid.size), 0))
    winner[order] = order[group_start]
    table = rel_dir.split("/")[0]
    for i, p in enumerate(parts):
        drop = loser[part_idx == i]
        if drop.any():
            full = pq.read_table(p)
            meta = {k.decode(): v.decode() for k, v in (full.schema.metadata or {}).items()
                    if k.startswith(b"stellar.")}
            write_part(p, full.filter(pa.array(~drop)), meta)
    hpx = rel_dir.split("=", 1)[1]
    written = []
    for code in np.unique(codes[loser]):
        rows = np.flatnonzero(loser & (codes == code))
        rows = rows[np.argsort(lines[rows], kind="stable")]
        f = str(names[code])
        reasons = [f"source_id: duplicate (first seen in {files[winner[r]]} line {lines[winner[r]]})" for r in rows]
        q = quarantine_rows(table, f, lines[rows].tolist(), sid[rows].tolist(), reasons)
        rel = f"quarantine/hpx={hpx}/part-dedup-{table}-{file_key(f)}.parquet"
        write_part(Path(version_dir) / rel, q, {"stellar.table": "quarantine", "stellar.source_file": f})
        written.append((rel, f))
    return {"quarantine_parts": written}


def ingest(cfg: IngestConfig, instrument: Instrument, conf_dir: str | None = None,
           mapper: Executor | None = None) -> dict:
    """Run the ingest stage; returns the summary (also written beside the tables). Holds the store's
    writer lock throughout (:class:`stellar.stage.StoreRun`): a second ingest on the same store refuses.

    Unlike the other stages, ingest is incremental per input file: "up to date" means every input file
    is unchanged since the committed version (size, mtime, format, settings), and a run re-reads only
    the files that changed, carrying the others' parts over."""
    with StoreRun("ingest", cfg.output_dir, settings_digest(cfg, instrument)) as run:
        return _ingest(run, cfg, instrument, conf_dir, mapper)


def run(cfg: StellarConfig, instrument: Instrument, executor: Executor | None = None) -> StageResult:
    """The stage contract (:mod:`stellar.stage`): the Gaia files and label catalogues into the tables store."""
    return StageResult.from_summary("ingest", ingest(cfg.ingest, instrument, cfg.conf_dir, mapper=executor))


def _ingest(run: StoreRun, cfg: IngestConfig, instrument: Instrument, conf_dir: str | None,
            mapper: Executor | None) -> dict:
    t0 = time.perf_counter()
    mapper = mapper or LOCAL
    store = run.store
    previous = store.current_manifest()
    digest = run.digest
    inputs = discover(cfg, instrument.name)
    if not inputs:
        raise IngestError("no input files found (check ingest.gaia_root, ingest.datalink, ingest.labels)")
    for lab in {i.catalogue for i in inputs if i.product == "labels"}:
        label_io.load_catalogue(lab, conf_dir)  # fail fast on a bad preset, before any work

    def fingerprint(inp: InputFile) -> str:
        return f"{inp.size}:{inp.mtime_ns}:{inp.fmt}:{inp.catalogue}:{digest}"

    prev_files = (previous or {}).get("files", {})
    # A file involved in duplicate resolution is re-parsed whenever anything changes: its
    # winners or losers may have come or gone.
    unchanged = [i for i in inputs if prev_files.get(i.source_file, {}).get("fingerprint") == fingerprint(i)
                 and not any("/part-dedup-" in p for p in prev_files[i.source_file]["parts"])]
    todo = [i for i in inputs if i not in unchanged]
    if previous and not todo and set(prev_files) == {i.source_file for i in inputs}:
        cleaned = store.clean_uncommitted()
        return {**previous["summary"], "up_to_date": True, "version": store.current_version(),
                "cleaned": cleaned, "seconds": time.perf_counter() - t0}

    # The restart plan: every (file, chunk) task of this run, and the files carried over. A run
    # killed after hours left its finished tasks' parts and done markers in its version folder;
    # the same plan on the same committed base carries on there instead of starting again.
    tasks = plan(todo, cfg.chunk_mb << 20, mapper.parallelism)
    plan_digest = settings_hash({
        "settings": digest, "carried": sorted((i.source_file, fingerprint(i)) for i in unchanged),
        "tasks": sorted((task_id(t), t.input.source_file, fingerprint(t.input), t.start, t.end) for t in tasks)})
    version = store.resumable(plan_digest)
    cleaned = store.clean_uncommitted(keep=version)
    resumed = version is not None
    version = version or run.new_version(plan_digest)
    run.version = version
    vdir = store.root / version
    prev_version = store.current_version()
    for inp in unchanged:
        for rel in prev_files[inp.source_file]["parts"]:
            store.link_part(prev_version, rel, version)
    # Checksums, in parallel before parsing: a file whose md5 is not the listed one has every row quarantined
    checked = [i for i in todo if cfg.verify_md5 and i.md5]
    actual = list(mapper.map(lambda i: md5_of(i.path), checked)) if checked else []
    md5_mismatch = {i.source_file: f"file: md5 mismatch (_MD5SUM.txt says {i.md5}, the file has {a})"
                    for i, a in zip(checked, actual) if a != i.md5}
    ctx = TaskContext(cfg.healpix_order, {"rvs": rvs_product(instrument.n_pixels),
                                          "xp": xp_product(cfg.keep_xp_correlations),
                                          "astrometry": astrometry_product(cfg.astrometry_columns)},
                      instrument.wave, conf_dir, str(vdir), md5_mismatch, tuple(instrument.labels))
    done = done_results(vdir)
    results = [done[task_id(t)] for t in tasks if task_id(t) in done]
    pending = [t for t in tasks if task_id(t) not in done]
    results += list(mapper.map(lambda t: run_task(t, ctx), pending))
    results = _requarantine_corrupt(results, tasks, ctx, mapper)
    lost = sorted({(r["source_file"], r["unreadable"]) for r in results if r.get("unreadable")
                   and not _allowed(r["source_file"], cfg.allow_unreadable)})
    if lost:
        raise IngestError(f"{len(lost)} input file{'s' if len(lost) > 1 else ''} could not be read at all: "
                          + "; ".join(f"{f}: {why}" for f, why in lost[:3])
                          + (f"; and {len(lost) - 3} more" if len(lost) > 3 else "")
                          + ". Nothing was committed; list a file in ingest.allow_unreadable to go on without it")
    store.seal(version)  # duplicate resolution rewrites parts in place: no resuming past this point

    # Per-file bookkeeping (rows in, parts) from this run and carried over from the last one.
    files: dict[str, dict] = {}
    for inp in unchanged:
        files[inp.source_file] = dict(prev_files[inp.source_file])
    for inp in todo:
        files[inp.source_file] = {"fingerprint": fingerprint(inp), "table": inp.product, "rows_in": 0,
                                  "parts": [], "notes": [], "provenance": {}}
    for r in sorted(results, key=lambda r: (r["source_file"], r["chunk"])):
        f = files[r["source_file"]]
        f["rows_in"] += r["rows_in"]
        f["parts"] += r["parts"]
        f["notes"] += r["notes"]
        if r["provenance"]:
            f["provenance"].update(r["provenance"])

    # Duplicates, per partition (parallel); rewritten parts are fresh files, links stay intact.
    partitions = sorted({str(Path(p).parent) for f in files.values() for p in f["parts"]
                         if not p.startswith("quarantine/")})
    n_groups = max(1, min(len(partitions), 2 * mapper.parallelism))
    groups = [partitions[i::n_groups] for i in range(n_groups)] if partitions else []
    dedup = list(mapper.map(lambda rels: [dedup_partition(str(vdir), rel) for rel in rels], groups))
    for d in (x for group in dedup for x in group):
        for rel, owner in d["quarantine_parts"]:
            if rel not in files[owner]["parts"]:
                files[owner]["parts"].append(rel)

    summary = account(vdir, files)
    checks = checksum_listing(cfg)
    checks["mismatched"] = sorted(md5_mismatch)
    summary["checksums"] = checks
    for key, what in (("no_md5sum", "bulk folders without _MD5SUM.txt (nothing verified there)"),
                      ("listed_missing", "files listed in _MD5SUM.txt but not on disk"),
                      ("unlisted", "data files not listed in _MD5SUM.txt (not verified)"),
                      ("mismatched", "files whose md5 is not the listed one (rows quarantined)"),
                      ("ignored", "names ignored as not data files")):
        if checks[key]:
            shown = ", ".join(checks[key][:3]) + (f" and {len(checks[key]) - 3} more" if len(checks[key]) > 3 else "")
            print(f"stellar ingest: warning: {len(checks[key])} {what}: {shown}", file=sys.stderr)
    summary.update({"version": version, "previous_version": prev_version, "reused_files": len(unchanged),
                    "parsed_files": len(todo), "tasks": len(tasks), "cleaned": cleaned,
                    "resumed": resumed, "tasks_resumed": len(tasks) - len(pending),
                    "settings_digest": digest, "seconds": round(time.perf_counter() - t0, 3)})
    bad_fraction = summary["quarantined"] / max(1, summary["rows_in"])
    summary["bad_fraction"] = round(bad_fraction, 6)
    (store.root / "_runs").mkdir(exist_ok=True)
    if bad_fraction > cfg.max_bad_fraction:
        (store.root / "_runs" / f"{version}-failed.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
        worst = sorted(summary["per_file"].items(), key=lambda kv: -kv[1]["quarantined"])[:3]
        raise IngestError(
            f"{summary['quarantined']} of {summary['rows_in']} rows ({bad_fraction:.1%}) were quarantined, above "
            f"ingest.max_bad_fraction={cfg.max_bad_fraction:.1%}; nothing was committed. Worst files: "
            + "; ".join(f"{k} ({v['quarantined']} bad, e.g. {v['example']})" for k, v in worst if v["quarantined"])
            + f". Details: {store.root / '_runs' / (version + '-failed.json')}")
    run.commit({k: v for k, v in summary.items() if k not in ("seconds", "cleaned")}, cfg.healpix_order,
               schema_version=1, files=files)
    (store.root / "_runs" / f"{version}.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def account(vdir: Path, files: dict[str, dict]) -> dict:
    """Count rows written and quarantined per input file from the parts themselves; check they add up."""
    written: dict[str, int] = defaultdict(int)
    quarantined: dict[str, int] = defaultdict(int)
    reasons: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    examples: dict[str, str] = {}
    for table in TABLES + ("quarantine",):
        folder = vdir / table
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob("hpx=*/part-*.parquet")):
            cols = ["source_file", "reason", "line"] if table == "quarantine" else ["source_file"]
            t = pq.read_table(p, columns=cols)
            if t.num_rows == 0:
                continue
            counts = pc.value_counts(t["source_file"]).to_pylist()
            target = quarantined if table == "quarantine" else written
            for c in counts:
                target[c["values"]] += c["counts"]
            if table == "quarantine":
                for f, r, ln in zip(t["source_file"].to_pylist(), t["reason"].to_pylist(), t["line"].to_pylist()):
                    reasons[f][_reason_kind(r)] += 1
                    examples.setdefault(f, r if ln is None else f"line {ln}: {r}")
    per_file = {}
    mismatched = []
    by_table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, f in sorted(files.items()):
        w, q = written.get(name, 0), quarantined.get(name, 0)
        top = max(reasons[name].items(), key=lambda kv: kv[1])[0] if reasons[name] else ""
        per_file[name] = {"table": f["table"], "rows_in": f["rows_in"], "written": w, "quarantined": q,
                          "top_reason": top, "example": examples.get(name, ""), "notes": f["notes"]}
        by_table[f["table"]]["rows_in"] += f["rows_in"]
        by_table[f["table"]]["written"] += w
        by_table[f["table"]]["quarantined"] += q
        if w + q != f["rows_in"]:
            mismatched.append(f"{name}: in {f['rows_in']} != written {w} + quarantined {q}")
    if mismatched:
        raise IngestError("row accounting does not add up (a bug; please report): " + "; ".join(mismatched[:5]))
    return {"rows_in": sum(v["rows_in"] for v in per_file.values()),
            "written": sum(v["written"] for v in per_file.values()),
            "quarantined": sum(v["quarantined"] for v in per_file.values()),
            "tables": {k: dict(v) for k, v in by_table.items()},
            "reasons": {k: dict(v) for k, v in reasons.items() if v},
            "per_file": per_file}


def _reason_kind(reason: str) -> str:
    """Group quarantine reasons for the summary (drop per-row specifics such as counts and line numbers)."""
    import re

    text = re.sub(r"\(first seen in .*\)", "", reason)
    text = re.sub(r"\b\d+\b", "N", text)
    return text.strip()[:100]

