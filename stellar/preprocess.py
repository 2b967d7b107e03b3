"""The preprocess stage: ingested tables -> one model-ready ``features`` table.

The ingested tables are all partitioned by the same HEALPix pixel of
``source_id``, so the join of rvs (the base: one feature row per spectrum),
xp, astrometry and labels is done partition by partition, in parallel, with
no shuffle of the catalogue. Each partition task computes the features
(stellar.features), applies the configured label quality cuts, assigns the
hash-based split, writes its part and returns counts and mergeable moments;
the driver merges the moments into normalisation statistics stored with the
table version (``stats.json``), and commits atomically.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stellar import __version__
from stellar.config import PreprocessConfig, StellarConfig
from stellar.errors import StellarError
from stellar.features import (FEATURE_SETTINGS, QUALITY_BITS, SCALAR_NAMES, RawStars, assign_split, finish_moments,
                              merge_moments, partial_moments, star_features)
from stellar.instruments import Instrument
from stellar.numerics import with_one_blas_thread
from stellar.runtime import LOCAL, Executor
from stellar.stage import StageResult, StoreRun
from stellar.tables import STATS, TableStore, fixed_list, settings_hash, write_part
from stellar.trust import PHYSICAL_ENVELOPE



class PreprocessError(StellarError):
    """A preprocess run that cannot go on: no ingested tables or partitions, or row accounting that does
    not add up."""
    pass


@dataclass(frozen=True)
class Context:
    """What every partition task needs: the ingested and output version folders, the stage config as a
    dict, the instrument's labels and pixel count."""

    tables_vdir: str
    out_vdir: str
    cfg: dict
    labels: tuple[str, ...]
    n_pixels: int


def _read_partition(vdir: str, table: str, hpx: int) -> pa.Table | None:
    folder = Path(vdir) / table / f"hpx={hpx}"
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        return None
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")


def _lookup(base_ids: np.ndarray, other: pa.Table | None) -> tuple[np.ndarray, np.ndarray]:
    """Row index in ``other`` for each base source_id, and whether it was found."""
    if other is None or other.num_rows == 0:
        return np.zeros(base_ids.size, dtype=np.int64), np.zeros(base_ids.size, dtype=bool)
    ids = other["source_id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], base_ids)
    pos = np.minimum(pos, ids.size - 1)
    found = ids[order][pos] == base_ids
    return order[pos], found


def _fixed(lists: pa.ChunkedArray | pa.Array, width: int, rows: np.ndarray, found: np.ndarray,
           dtype=np.float64) -> np.ndarray:
    """Gather fixed-width list rows into a dense (n, width) array; missing/null rows are NaN."""
    out = np.full((rows.size, width), np.nan, dtype=dtype)
    if not found.any():
        return out
    arr = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    taken = arr.take(pa.array(rows[found]))
    lengths = pc.fill_null(pc.list_value_length(taken), 0).to_numpy(zero_copy_only=False)
    full = lengths == width
    if full.any():
        values = pc.list_flatten(taken.filter(pa.array(full))).to_numpy(zero_copy_only=False)
        dest = np.flatnonzero(found)[full]
        out[dest] = values.reshape(-1, width)
    return out


def _column(t: pa.Table | None, name: str, rows: np.ndarray, found: np.ndarray, dtype=np.float64) -> np.ndarray:
    out = np.full(rows.size, np.nan, dtype=dtype)
    if t is None or name not in t.column_names or not found.any():
        return out
    vals = t[name].combine_chunks().take(pa.array(rows[found]))
    out[found] = pc.fill_null(vals.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    return out


def label_cut_reasons(labels: pa.Table | None, rows: np.ndarray, found: np.ndarray, cfg: dict,
                      required: tuple[str, ...]) -> np.ndarray:
    """Why each labelled star cannot train (None: it can). Unlabelled stars: None too."""
    cuts = cfg["label_cuts"]
    n = rows.size
    reason = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, text: str) -> None:
        sel = found & mask & (reason == None)  # noqa: E711 - elementwise on an object array
        reason[sel] = text

    for lab in required:
        flag(~np.isfinite(_column(labels, lab, rows, found)), f"missing label {lab}")
    for lab in required:  # a catalogue's sentinel (-9999) or a damaged value must never train the model
        v, err = _column(labels, lab, rows, found), _column(labels, f"{lab}_err", rows, found)
        lo, hi = PHYSICAL_ENVELOPE.get(lab, (-np.inf, np.inf))
        flag(np.isfinite(v) & ((v < lo) | (v > hi)), f"label {lab} outside the physical envelope")
        flag(np.isfinite(err) & (err < 0), f"label {lab}_err negative")
    if cuts["min_snr"] is not None:
        snr = _column(labels, "snr", rows, found)
        flag(np.isfinite(snr) & (snr < cuts["min_snr"]), f"label S/N below {cuts['min_snr']:g}")
    for col, bits, text in (("aspcapflag", cuts["aspcapflag_bad_bits"], "ASPCAPFLAG bad bit"),
                            ("starflag", cuts["starflag_bad_bits"], "STARFLAG bad bit")):
        if bits:
            mask_bits = np.int64(sum(1 << b for b in bits))
            v = _column(labels, col, rows, found)
            ok = np.isfinite(v)
            flag(ok & ((np.where(ok, v, 0).astype(np.int64) & mask_bits) != 0), text)
    if cuts["flag_sp_must_be_zero"]:
        v = _column(labels, "flag_sp", rows, found)
        flag(np.isfinite(v) & (v != 0), "GALAH flag_sp not 0")
    return reason


def features_schema(n_spec: int, n_xp: int, labels: tuple[str, ...]) -> pa.Schema:
    """The ``features`` schema: fixed-size spectrum, error, mask, XP and scalar arrays, S/N and quality,
    each label with its error, the label catalogue, the label cut reason and the split."""
    fields = [pa.field("source_id", pa.int64()),
              pa.field("spectrum", pa.list_(pa.float32(), n_spec)),
              pa.field("spectrum_error", pa.list_(pa.float32(), n_spec)),
              pa.field("spectrum_mask", pa.list_(pa.uint8(), n_spec)),
              pa.field("xp", pa.list_(pa.float32(), n_xp)),
              pa.field("scalars", pa.list_(pa.float32(), len(SCALAR_NAMES))),
              pa.field("snr", pa.float32()), pa.field("n_masked", pa.int16()), pa.field("quality", pa.int32())]
    for lab in labels:
        fields += [pa.field(lab, pa.float32()), pa.field(f"{lab}_err", pa.float32())]
    fields += [pa.field("label_catalogue", pa.string()), pa.field("label_cut_reason", pa.string()),
               pa.field("split", pa.string())]
    return pa.schema(fields)



@with_one_blas_thread  # the stats must round alike in-process and on executors (stellar.numerics)
def build_partition(hpx: int, ctx: Context) -> dict:
    """Join one HEALPix partition's rvs, xp, astrometry and labels and write its features part.

    One row per spectrum: missing inputs are filled and flagged in ``quality``, never dropped. Returns
    the partition's counts and the mergeable moments of its training stars' inputs and labels (None
    without spectra), from which the driver builds ``stats.json``."""
    cfg = ctx.cfg
    rvs = _read_partition(ctx.tables_vdir, "rvs", hpx)
    xp = _read_partition(ctx.tables_vdir, "xp", hpx)
    ast = _read_partition(ctx.tables_vdir, "astrometry", hpx)
    lab = _read_partition(ctx.tables_vdir, "labels", hpx)
    counts: Counter = Counter()
    if rvs is None or rvs.num_rows == 0:
        for name, t in (("xp_without_spectrum", xp), ("astrometry_without_spectrum", ast),
                        ("labels_without_spectrum", lab)):
            counts[name] += 0 if t is None else t.num_rows
        return {"hpx": hpx, "counts": dict(counts), "moments": None}
    rvs = rvs.sort_by("source_id")
    sid = rvs["source_id"].to_numpy()
    n = sid.size
    xi, xf = _lookup(sid, xp)
    ai, af = _lookup(sid, ast)
    li, lf = _lookup(sid, lab)
    rows, every = np.arange(n), np.ones(n, bool)
    feat = star_features(RawStars(
        flux=_fixed(rvs["flux"], ctx.n_pixels, rows, every, np.float32),
        flux_error=_fixed(rvs["flux_error"], ctx.n_pixels, rows, every, np.float32),
        bp=_fixed(xp["bp_coefficients"], 55, xi, xf) if xp is not None else np.full((n, 55), np.nan),
        rp=_fixed(xp["rp_coefficients"], 55, xi, xf) if xp is not None else np.full((n, 55), np.nan),
        bp_n_relevant=_column(xp, "bp_n_relevant_bases", xi, xf), rp_n_relevant=_column(xp, "rp_n_relevant_bases", xi, xf),
        g=_column(ast, "phot_g_mean_mag", ai, af), g_flux=_column(ast, "phot_g_mean_flux", ai, af),
        bp_mag=_column(ast, "phot_bp_mean_mag", ai, af), rp_mag=_column(ast, "phot_rp_mean_mag", ai, af),
        parallax=_column(ast, "parallax", ai, af), parallax_error=_column(ast, "parallax_error", ai, af),
        snr=_column(ast, "rvs_spec_sig_to_noise", ai, af), has_xp=xf, has_astrometry=af), cfg)
    q, xp_feat, scalars, snr = feat["quality"], feat["xp"], feat["scalars"], feat["snr"]

    required = tuple(cfg["label_cuts"]["required_labels"] or ctx.labels)
    reason = label_cut_reasons(lab, li, lf, cfg, required)
    usable = lf & (reason == None)  # noqa: E711
    split = assign_split(sid, usable, cfg["split"]["train"], cfg["split"]["validation"], cfg["split"]["seed"])

    cols: dict[str, pa.Array] = {
        "source_id": pa.array(sid),
        "spectrum": fixed_list(feat["spectrum"], pa.float32()),
        "spectrum_error": fixed_list(feat["spectrum_error"], pa.float32()),
        "spectrum_mask": fixed_list(feat["spectrum_mask"], pa.uint8()),
        "xp": fixed_list(xp_feat, pa.float32()),
        "scalars": fixed_list(scalars, pa.float32()),
        "snr": pa.array(snr), "n_masked": pa.array(feat["n_masked"]), "quality": pa.array(q),
    }
    label_values = {}
    for name in ctx.labels:
        v = _column(lab, name, li, lf).astype(np.float32)
        label_values[name] = v
        cols[name] = pa.array(v, type=pa.float32(), from_pandas=True)
        cols[f"{name}_err"] = pa.array(_column(lab, f"{name}_err", li, lf).astype(np.float32), from_pandas=True)
    cat = np.full(n, None, dtype=object)
    if lab is not None and lf.any():
        cat[lf] = np.asarray(lab["catalogue"].combine_chunks().take(pa.array(li[lf])).to_pylist(), dtype=object)
    cols["label_catalogue"] = pa.array(cat, pa.string())
    cols["label_cut_reason"] = pa.array(reason, pa.string())
    cols["split"] = pa.array(split, pa.string())
    schema = features_schema(feat["spectrum"].shape[1], xp_feat.shape[1], ctx.labels)
    table = pa.table([cols[f.name] for f in schema], schema=schema)
    write_part(Path(ctx.out_vdir) / "features" / f"hpx={hpx}" / f"part-{hpx:06d}.parquet", table,
               {"stellar.table": "features", "stellar.scalars": json.dumps(SCALAR_NAMES)})

    counts["stars"] += n
    counts["with_xp"] += int(xf.sum())
    counts["with_astrometry"] += int(af.sum())
    counts["with_label_row"] += int(lf.sum())
    counts["usable_labels"] += int(usable.sum())
    for name, bit in QUALITY_BITS.items():
        counts[f"quality:{name}"] += int(((q & bit) != 0).sum())
    for r in reason[lf & ~usable]:
        counts[f"cut:{r}"] += 1
    for s in ("train", "validation", "test", "observed"):
        counts[f"split:{s}"] += int((split == s).sum())
    for name, t, found in (("xp", xp, xf), ("astrometry", ast, af), ("labels", lab, lf)):
        matched = int(found.sum())
        counts[f"{name}_without_spectrum"] += (0 if t is None else t.num_rows) - matched
    train = split == "train"
    good_pix = feat["spectrum_mask"][train] == 0
    flux_train = feat["spectrum"][train][good_pix]
    moments = {
        "xp": partial_moments(xp_feat[train]),
        "scalars": partial_moments(scalars[train]),
        "labels": partial_moments(np.stack([label_values[k] for k in ctx.labels], axis=1)[train]),
        "spectrum": partial_moments(flux_train.reshape(-1, 1)),
    }
    return {"hpx": hpx, "counts": dict(counts), "moments": moments}


def settings_digest(cfg: PreprocessConfig, instrument: Instrument, tables_version: str) -> str:
    """The digest of what the features depend on: the stage config (not its output folder), the
    instrument and its labels, the tables version, the code version and the scalar features' names (so
    features written before a scalar was added or changed are rebuilt, even within one code version)."""
    payload = {"cfg": cfg.model_dump(exclude={"output_dir"}), "instrument": instrument.name,
               "labels": instrument.labels, "tables": tables_version, "version": __version__,
               "scalars": list(SCALAR_NAMES)}
    return settings_hash(payload)


def preprocess(cfg: PreprocessConfig, instrument: Instrument, tables_root: str,
               mapper: Executor | None = None) -> dict:
    """Run the stage; returns the summary. Skips when the committed features match inputs and config.
    Holds the features store's writer lock throughout (:class:`stellar.stage.StoreRun`)."""
    t0 = time.perf_counter()
    mapper = mapper or LOCAL
    source = TableStore(tables_root)
    tables_version = source.current_version()
    if tables_version is None:
        raise PreprocessError(f"no ingested tables under {tables_root} (run 'stellar ingest' first)")
    with StoreRun("preprocess", cfg.output_dir, settings_digest(cfg, instrument, tables_version)) as run:
        current = run.committed()
        if current:
            return {**current, "up_to_date": True, "seconds": time.perf_counter() - t0}
        return _build(run, cfg, instrument, source, tables_version, mapper, t0)


def run(cfg: StellarConfig, instrument: Instrument, executor: Executor | None = None) -> StageResult:
    """The stage contract (:mod:`stellar.stage`): features from the committed ingest tables."""
    return StageResult.from_summary("preprocess", preprocess(cfg.preprocess, instrument, cfg.ingest.output_dir,
                                                             mapper=executor))


def _build(run: StoreRun, cfg: PreprocessConfig, instrument: Instrument, source: TableStore, tables_version: str,
           mapper: Executor, t0: float) -> dict:
    vdir_in = source.root / tables_version
    hpxs = sorted({int(p.name.split("=", 1)[1]) for t in ("rvs", "xp", "astrometry", "labels")
                   for p in (vdir_in / t).glob("hpx=*") if p.is_dir()})
    if not hpxs:
        raise PreprocessError(f"ingested tables {vdir_in} hold no partitions")
    store = run.store
    version = run.new_version()
    ctx = Context(str(vdir_in), str(store.root / version), cfg.model_dump(), tuple(instrument.labels),
                  instrument.n_pixels)
    n_groups = max(1, min(len(hpxs), 4 * mapper.parallelism))
    groups = [hpxs[i::n_groups] for i in range(n_groups)]
    results = [r for grp in mapper.map(lambda g: [build_partition(h, ctx) for h in g], groups) for r in grp]
    results.sort(key=lambda r: r["hpx"])  # merge in a fixed order: identical stats however tasks were grouped
    counts: Counter = Counter()
    for r in results:
        counts.update(r["counts"])
    rvs_rows = json.loads((vdir_in / "_manifest.json").read_text())["summary"]["tables"].get("rvs", {}).get("written", 0)
    if counts["stars"] != rvs_rows:
        raise PreprocessError(f"row accounting: {rvs_rows} spectra in, {counts['stars']} feature rows out")
    moments = [r["moments"] for r in results if r["moments"] is not None]
    stats = {
        "scalar_names": list(SCALAR_NAMES), "label_names": list(instrument.labels),
        "xp_bases": cfg.xp_bases, "rebin": cfg.rebin, "n_spectrum": (instrument.n_pixels // cfg.rebin),
        "wavelength": _rebinned_wave(instrument, cfg.rebin).tolist(),
        "quality_bits": QUALITY_BITS,
        # what a model needs to rebuild these features from archive arrays (stellar.api)
        "preprocess": {**{k: getattr(cfg, k) for k in FEATURE_SETTINGS}, "instrument": instrument.name,
                       "n_pixels": instrument.n_pixels, "input_wavelength": instrument.wave.tolist()},
    }
    for key in ("xp", "scalars", "labels", "spectrum"):
        stats[key] = finish_moments(merge_moments([m[key] for m in moments]))
    (store.root / version / STATS).write_text(json.dumps(stats, indent=1) + "\n")
    summary = {"version": version, "tables_version": tables_version, "settings_digest": run.digest,
               "partitions": len(hpxs), "counts": dict(sorted(counts.items())),
               "seconds": round(time.perf_counter() - t0, 3)}
    return run.commit(summary, source.healpix_order(), tables_version=tables_version)


def _rebinned_wave(instrument: Instrument, factor: int) -> np.ndarray:
    w = instrument.wave
    nb = w.size // factor
    return w[: nb * factor].reshape(nb, factor).mean(axis=1)



