"""The predictions as a HATS catalogue that LSDB opens, cone-searches and cross-matches.

HATS (Hierarchical Adaptive Tiling Scheme, https://www.ivoa.net/documents/Notes/HATS/) splits a
catalogue into HEALPix pixels of different orders so that every leaf file holds at most
``max_rows`` rows: dense regions get small pixels, sparse ones large pixels. The layout::

    OUTPUT/properties                 catalogue properties (rows, ra/dec columns, builder, provenance)
    OUTPUT/partition_info.csv         Norder, Npix of every leaf
    OUTPUT/dataset/Norder=k/Dir=d/Npix=p.parquet   rows sorted by _healpix_29
    OUTPUT/dataset/_metadata, _common_metadata     Parquet footers / schema (VOParquet field metadata)

Rows carry ``_healpix_29`` (the order-29 nested HEALPix index of (ra, dec), the HATS spatial index),
``source_id``, the Gaia ``designation``, ``ra``/``dec`` from the ingested gaia_source rows, and every
prediction column with its unit, UCD and description (:mod:`stellar.columns`).

A star with no gaia_source row has no position: it keeps null ``ra``/``dec`` and is placed by the
level-12 pixel its ``source_id`` encodes, so it is in the catalogue (nothing is dropped) but no cone
search on ra/dec returns it; the result counts such rows.

The write streams: the predictions and the astrometry are joined one ``hpx=`` partition at a time
(pass 1: the per-pixel histogram that decides the partitioning, with the hats library's
``generate_alignment``; pass 2: rows split to their destination pixel into a staging folder;
pass 3: each destination pixel's pieces concatenated, sorted and written). Memory is one input
partition or one output leaf, whichever is larger, at any catalogue size. The hats library
writes the metadata files; the catalogue appears under its name only once complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from stellar.columns import POSITION_COLUMNS, SPATIAL_INDEX_COLUMN, dictionary, with_field_metadata
from stellar.healpix import SOURCE_ID_SHIFT_L12
from stellar.tables import TableStore

DESIGNATION_PREFIX = "Gaia DR3"
DEFAULT_MAX_ROWS = 500_000
DEFAULT_HISTOGRAM_ORDER = 10


def _hpx_values(root: Path) -> list[int]:
    """The ``hpx=`` partition values under a hive-partitioned table folder."""
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("=", 1)[1]) for p in root.iterdir() if p.is_dir() and p.name.startswith("hpx="))


def _read_hpx(dataset: ds.Dataset | None, hpx: int, columns: list[str] | None = None, flt=None) -> pa.Table | None:
    """One ``hpx`` partition of a hive-partitioned dataset (the partition is pruned, not scanned), filtered."""
    if dataset is None:
        return None
    cond = pc.field("hpx") == hpx
    return dataset.to_table(columns=columns, filter=cond if flt is None else cond & flt)


def _placed(pred: pa.Table, ast: pa.Table | None, designation_prefix: str) -> pa.Table:
    """One partition's predictions with _healpix_29, designation, ra and dec first (hpx dropped)."""
    if ast is not None and ast.num_rows:
        # one astrometry row per source_id (ingest resolves duplicates); the join's row order does not
        # matter: each leaf is sorted by (_healpix_29, source_id) when it is written
        joined = pred.join(ast, "source_id", join_type="left outer", use_threads=False)
    else:
        joined = pred.append_column("ra", pa.nulls(pred.num_rows, pa.float64())) \
            .append_column("dec", pa.nulls(pred.num_rows, pa.float64()))
    sid = joined["source_id"].to_numpy().astype(np.int64)
    ra = joined["ra"].to_numpy(zero_copy_only=False).astype(np.float64)
    dec = joined["dec"].to_numpy(zero_copy_only=False).astype(np.float64)
    have = np.isfinite(ra) & np.isfinite(dec)
    # no position: the level-12 pixel the source_id encodes, as its first order-29 index
    index = (sid >> SOURCE_ID_SHIFT_L12) << (2 * (29 - 12))
    if have.any():
        from hats.pixel_math.spatial_index import compute_spatial_index

        index[have] = compute_spatial_index(ra[have], dec[have])
    designation = pc.binary_join_element_wise(designation_prefix, pc.cast(joined["source_id"], pa.string()), " ")
    rest = [n for n in joined.column_names if n not in ("source_id", "ra", "dec", "hpx")]
    cols = [pa.array(index, pa.int64()), joined["source_id"], designation, joined["ra"], joined["dec"]]
    names = [SPATIAL_INDEX_COLUMN, "source_id", "designation", "ra", "dec"]
    return pa.Table.from_arrays(cols + [joined[n] for n in rest], names=names + rest)


def _is_vounit(unit: str) -> bool:
    """Whether ``unit`` is legal VOUnit, the syntax of VOParquet's embedded VOTable (K and deg are; dex and
    the CDS logarithms are not, so log g and the abundances carry their unit in the description there)."""
    import warnings

    import astropy.units as u

    if not unit:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            u.Unit(unit, format="vounit")
    except (ValueError, Warning):
        return False
    return True


def write_hats(predictions_root: str, output: str, *, where=None, tables_root: str | None = None,
               catalog_name: str | None = None, max_rows: int = DEFAULT_MAX_ROWS,
               histogram_order: int = DEFAULT_HISTOGRAM_ORDER, designation_prefix: str = DESIGNATION_PREFIX,
               provenance: dict | None = None, overwrite: bool = False) -> dict:
    """Write the committed predictions (rows passing the Arrow filter ``where``) as a HATS catalogue
    in the folder ``output``. ``tables_root``: the ingested tables store whose ``astrometry`` gives ra
    and dec (default: ``tables`` beside the predictions). ``max_rows``: the most rows in one leaf
    (hats' ``pixel_threshold``); ``histogram_order``: the finest order a leaf may have.

    Returns rows written, rows without a position, the leaf pixels by order and the path."""
    from hats.catalog import PartitionInfo, TableProperties
    from hats.io import write_parquet_metadata
    from hats.io.parquet_metadata import write_voparquet_in_common_metadata
    from hats.io.paths import new_pixel_catalog_file
    from hats.pixel_math import HealpixPixel
    from hats.pixel_math.partition_stats import generate_alignment

    if not 1 <= max_rows:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if not 0 <= histogram_order <= 13:
        raise ValueError(f"histogram_order must be 0..13, got {histogram_order}")
    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{output} exists (use --overwrite)")
    store = TableStore(predictions_root)
    man = store.current_manifest()
    pred_root = store.table_path("predictions")
    tables = TableStore(tables_root or Path(predictions_root).parent / "tables")
    ast_root = tables.table_path("astrometry") if tables.current_manifest() is not None else None
    labels = man.get("summary", {}).get("labels", [])
    cols = dictionary(labels, POSITION_COLUMNS)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    staging = tmp / "_staging"
    try:
        staging.mkdir(parents=True)
        hpxs = _hpx_values(pred_root)
        pred_ds = ds.dataset(pred_root, format="parquet", partitioning="hive")
        ast_ds = (ds.dataset(ast_root, format="parquet", partitioning="hive")
                  if ast_root is not None and ast_root.is_dir() else None)

        def partitions():
            for hpx in hpxs:
                pred = _read_hpx(pred_ds, hpx, flt=where)
                if pred is None or pred.num_rows == 0:
                    continue
                ast = _read_hpx(ast_ds, hpx, ["source_id", "ra", "dec"], pc.field("source_id").isin(pred["source_id"]))
                yield hpx, _placed(pred, ast, designation_prefix)

        # pass 1: counts per pixel at histogram_order, the rows written to staging once (joined)
        shift = 2 * (29 - histogram_order)
        histogram = np.zeros(12 * 4**histogram_order, dtype=np.int64)
        rows = unplaced = 0
        for hpx, t in partitions():
            pix, count = np.unique(t[SPATIAL_INDEX_COLUMN].to_numpy() >> shift, return_counts=True)
            histogram[pix] += count  # the partition's few pixels, not a full-sky array per partition
            rows += t.num_rows
            unplaced += int(pc.sum(pc.is_null(t["ra"], nan_is_null=True).cast(pa.int64())).as_py() or 0)
            pq.write_table(t, staging / f"hpx={hpx}.parquet")
        if rows == 0:
            raise ValueError("no rows to write (the filter left none)")
        if histogram.max() > max_rows:
            raise ValueError(f"{int(histogram.max())} stars share one order-{histogram_order} pixel, more than the "
                             f"{max_rows} a partition may hold: raise the limit (--hats-max-rows)")
        alignment = generate_alignment(histogram, highest_order=histogram_order, lowest_order=0,
                                       threshold=max_rows, drop_empty_siblings=True)
        dest_order = np.full(histogram.size, -1, np.int64)
        dest_pix = np.full(histogram.size, -1, np.int64)
        occupied = np.nonzero(histogram)[0]
        dest = np.array(alignment[occupied].tolist(), dtype=np.int64).reshape(-1, 3)  # (order, pixel, rows)
        dest_order[occupied], dest_pix[occupied] = dest[:, 0], dest[:, 1]
        # pass 2: each staged partition split by destination leaf
        pieces: dict[tuple[int, int], list[Path]] = {}
        for f in sorted(staging.glob("hpx=*.parquet")):
            t = pq.read_table(f)
            fine = t[SPATIAL_INDEX_COLUMN].to_numpy() >> shift
            key = dest_order[fine] * (1 << 40) + dest_pix[fine]
            order = np.argsort(key, kind="stable")
            t, key = t.take(order), key[order]
            starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            for s, e in zip(starts, np.r_[starts[1:], len(key)]):
                o, p = int(key[s] >> 40), int(key[s] & ((1 << 40) - 1))
                piece = staging / f"o{o}_p{p}_{f.stem}.parquet"
                pq.write_table(t.slice(s, e - s), piece)
                pieces.setdefault((o, p), []).append(piece)
            f.unlink()
        # pass 3: one sorted file per leaf
        pixels, counts = [], []
        for (o, p), files in sorted(pieces.items()):
            t = pa.concat_tables([pq.read_table(x) for x in files]).sort_by([(SPATIAL_INDEX_COLUMN, "ascending"),
                                                                            ("source_id", "ascending")])
            pixel = HealpixPixel(o, p)
            path = new_pixel_catalog_file(tmp, pixel)
            pq.write_table(with_field_metadata(t, labels, POSITION_COLUMNS), str(path), compression="zstd")
            pixels.append(pixel)
            counts.append(t.num_rows)
            for x in files:
                x.unlink()
        shutil.rmtree(staging)

        write_parquet_metadata(tmp, create_thumbnail=False)
        write_voparquet_in_common_metadata(
            tmp, field_units={n: c.unit for n, c in cols.items() if _is_vounit(c.unit)},
            field_ucds={n: c.ucd for n, c in cols.items()},
            field_descriptions={n: c.description for n, c in cols.items()})
        info = PartitionInfo.from_healpix(pixels)
        info.write_to_file(tmp / "partition_info.csv")
        from stellar import __version__

        extra = {f"stellar_{k}": str(v).replace("\n", " ") for k, v in (provenance or {}).items()}
        props = TableProperties(
            catalog_name=catalog_name or out.name, catalog_type="object", total_rows=int(rows),
            ra_column="ra", dec_column="dec", healpix_column=SPATIAL_INDEX_COLUMN, healpix_order=29,
            hats_max_rows=int(max(counts)), hats_order=int(max(p.order for p in pixels)),
            moc_sky_fraction=float(info.calculate_fractional_coverage()),
            **TableProperties.new_provenance_dict(tmp, builder=f"stellar v{__version__}"), **extra)
        props.to_properties_file(tmp)
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{output} exists (use --overwrite)")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    by_order: dict[int, int] = {}
    for p in pixels:
        by_order[p.order] = by_order.get(p.order, 0) + 1
    return {"rows": int(rows), "rows_without_position": int(unplaced), "partitions": len(pixels),
            "partitions_by_order": dict(sorted(by_order.items())), "max_rows_in_a_partition": int(max(counts)),
            "path": str(out)}
