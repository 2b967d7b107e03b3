"""Training-sample selection: a t-SNE (or UMAP) map of training and observed stars, and train-like flags.

The reference analysis trusts labels only for observed stars that fall among
training stars in a t-SNE map of the spectra. Here:

1. features of hash-chosen, S/N-stratified samples of the training stars
   (``train_sample``) and of the observed stars (``observed_sample``) are read
   on the driver (the sample sizes, not the catalogue, bound driver memory;
   of the rest only source_id, S/N and split reach it);
2. PCA (fitted on the training stars) reduces spectrum (+ XP) features;
3. openTSNE (default) or UMAP embeds that fit set in 2-D;
4. every other star is placed on the fitted map by the embedding's
   ``transform``, partition by partition in parallel tasks; the fitted
   embedding travels to the workers once per task group;
5. a star's score is the share of training stars among its k nearest fit-set
   neighbours on the map, relative to their share in the fit set;
   ``train_like`` is score >= threshold.

The fitted map is this run's own object (never read from elsewhere).
"""

from __future__ import annotations

import pickle
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from stellar import __version__
from stellar.config import SelectConfig, StellarConfig
from stellar.errors import StellarError
from stellar.features import split_hash
from stellar.mapping import MapReference, gradient_descent_settings
from stellar.mapping import feature_matrix as map_features
from stellar.numerics import with_one_blas_thread
from stellar.tables import load_stats
from stellar.runtime import LOCAL, Executor
from stellar.stage import StageResult, StoreRun
from stellar.tables import TableStore, settings_hash, write_part


class SelectError(StellarError):
    """A selection run that cannot go on: no features, too few training stars for the map, or row
    accounting that does not add up."""
    pass


def _matrix(col: pa.ChunkedArray, n: int) -> np.ndarray:
    return col.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)


def feature_matrix(table: pa.Table, stats: dict, use_xp: bool) -> np.ndarray:
    """The map's input per star of a features table (:func:`stellar.mapping.feature_matrix`)."""
    n = table.num_rows
    return map_features(_matrix(table["spectrum"], n), _matrix(table["xp"], n) if use_xp else None, stats, use_xp)


@dataclass
class FittedMap:
    """This run's fitted map: the arrays every placement reads (:class:`~stellar.mapping.MapReference`,
    also what the model carries) and, for UMAP only, the fitted object its ``transform`` needs."""

    reference: MapReference
    umap: object = None

    @property
    def ref_xy(self) -> np.ndarray:
        return self.reference.ref_xy

    @property
    def ref_is_train(self) -> np.ndarray:
        return self.reference.ref_is_train

    def project(self, x: np.ndarray) -> np.ndarray:
        """Features -> coordinates in the fitted PCA basis (the embedding's input)."""
        return self.reference.project(x)

    def place(self, z: np.ndarray) -> np.ndarray:
        """Place new points on the map: t-SNE through the stored arrays (the path a model applied to a
        new survey takes); UMAP through a fresh copy of this run's own fitted object."""
        if self.umap is None:
            return self.reference.place(z)
        if len(z) == 0:
            return np.zeros((0, 2))
        fresh = pickle.loads(pickle.dumps(self.umap))  # noqa: S301 - our own in-memory object
        return np.asarray(fresh.transform(z))


def _read(root: str, flt, columns: list[str]) -> pa.Table:
    path = TableStore(root).table_path("features")
    return ds.dataset(path, format="parquet", partitioning="hive").to_table(columns=columns, filter=flt)


def _hash_sample(sid: np.ndarray, snr: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Choose about n of the stars by a hash of source_id, each S/N quartile sampled alike:
    the same stars whatever the partitioning, and no S/N range under-represented on the map."""
    frac = min(1.0, n / max(1, len(sid)))
    if frac >= 1.0:
        return np.ones(len(sid), dtype=bool)
    edges = np.quantile(snr, [0.25, 0.5, 0.75]) if len(snr) else []
    stratum = np.searchsorted(edges, snr)
    u = split_hash(sid, seed)
    chosen = np.zeros(len(sid), dtype=bool)
    for s in range(4):
        m = stratum == s
        if m.any():
            chosen[m] = u[m] < frac
    return chosen


@with_one_blas_thread  # PCA, t-SNE and placement under one thread policy (stellar.numerics)
def fit_map(cfg: SelectConfig, features_root: str, stats: dict) -> tuple[FittedMap, pa.Table]:
    """Fit the map on the driver: hash-chosen, S/N-stratified samples of training and observed stars
    (only their spectra are read), PCA fitted on the training stars, then t-SNE or UMAP.
    Returns the map and the fit set's table, sorted by source_id."""
    cols = ["source_id", "spectrum", "xp", "split", "snr"]
    # Only ids and S/N of the whole catalogue reach the driver; spectra only for the chosen fit set.
    ids = _read(features_root, None, ["source_id", "snr", "split"])
    sid, snr = ids["source_id"].to_numpy(), ids["snr"].to_numpy()
    train = ids["split"].to_numpy(zero_copy_only=False) == "train"
    chosen = np.zeros(len(sid), dtype=bool)
    chosen[train] = _hash_sample(sid[train], snr[train], cfg.train_sample, cfg.seed + 11)
    n_obs = min(cfg.observed_sample, int(cfg.observed_per_training * chosen[train].sum()))
    chosen[~train] = _hash_sample(sid[~train], snr[~train], n_obs, cfg.seed + 17)
    picked = pa.array(np.sort(sid[chosen]), pa.int64())
    fit = _read(features_root, pc.field("source_id").isin(picked), cols).sort_by("source_id")
    if (fit["split"].to_numpy(zero_copy_only=False) == "train").sum() < max(cfg.neighbours, 3 * cfg.perplexity + 1):
        raise SelectError(f"too few training stars to build the map (need > {3 * cfg.perplexity} for perplexity "
                          f"{cfg.perplexity})")
    x = feature_matrix(fit, stats, cfg.use_xp)
    is_train = fit["split"].to_numpy(zero_copy_only=False) == "train"
    from sklearn.decomposition import PCA

    pca = PCA(cfg.pca_components, random_state=cfg.seed).fit(x[is_train])
    z = pca.transform(x)
    settings = {"method": cfg.method, "use_xp": cfg.use_xp, "perplexity": cfg.perplexity,
                "neighbours": cfg.neighbours, "threshold": cfg.threshold, "seed": cfg.seed}
    if cfg.method == "tsne":
        from openTSNE import TSNE

        # exact neighbours: the approximate index (Annoy) is rebuilt differently in each worker process,
        # which would make a star's placement depend on where it ran
        emb = TSNE(perplexity=cfg.perplexity, n_jobs=1, random_state=cfg.seed, neighbors="exact",
                   verbose=False).fit(z)
        # placement by FFT interpolation whatever the group size: openTSNE's "auto" takes Barnes-Hut
        # below 10,000 points, several times slower for the same result
        emb.gradient_descent_params["negative_gradient_method"] = cfg.place_gradient
        settings["gradient_descent"] = gradient_descent_settings(emb.gradient_descent_params)
        xy, fitted_umap = np.asarray(emb), None
    else:
        import umap

        fitted_umap = umap.UMAP(n_neighbors=cfg.perplexity, random_state=cfg.seed, n_jobs=1).fit(z)
        xy = fitted_umap.embedding_
    ref = MapReference(np.asarray(pca.mean_, np.float64), np.asarray(pca.components_, np.float64),
                       np.asarray(z, np.float64), np.asarray(xy, np.float64), is_train,
                       fit["source_id"].to_numpy().astype(np.int64), settings)
    return FittedMap(ref, fitted_umap), fit


@dataclass(frozen=True)
class Ctx:
    """What every placement task needs: the features and output version folders and the normalisation
    statistics (whether XP is embedded, k and the threshold are the map's own settings)."""

    features_vdir: str
    out_vdir: str
    stats: dict


@with_one_blas_thread
def place_group(parts: list[str], shared, ctx: Ctx) -> list[dict]:
    """Place the stars of several partitions with one ``transform`` call (it has a high fixed cost).
    ``shared.value`` is the fitted map (its t-SNE reference already built), shipped to each executor once."""
    t0 = time.perf_counter()
    fmap = shared.value
    t_load = time.perf_counter() - t0
    tables = [pq.read_table(Path(ctx.features_vdir) / "features" / p, columns=["source_id", "spectrum", "xp", "split"])
              for p in parts]
    if not tables:
        return []
    allt = pa.concat_tables(tables)
    sid = allt["source_id"].to_numpy()
    xy, in_fit = fmap.reference.fitted_positions(sid)
    rest = ~in_fit
    ref = fmap.reference
    t1 = time.perf_counter()
    if rest.any():
        xy[rest] = fmap.place(fmap.project(feature_matrix(allt.filter(pa.array(rest)), ctx.stats,
                                                          ref.settings["use_xp"])))
    t_transform = time.perf_counter() - t1
    score = ref.scores(xy)  # share of training stars among the map's k nearest fit-set stars
    out = []
    lo = 0
    for p, t in zip(parts, tables):
        sl = slice(lo, lo + t.num_rows)
        lo += t.num_rows
        table = pa.table({"source_id": pa.array(sid[sl]), "x": pa.array(xy[sl, 0].astype(np.float32)),
                          "y": pa.array(xy[sl, 1].astype(np.float32)), "score": pa.array(score[sl].astype(np.float32)),
                          "train_like": pa.array(score[sl] >= ref.threshold), "in_fit": pa.array(in_fit[sl]),
                          "split": t["split"]})
        write_part(Path(ctx.out_vdir) / "selection" / p, table, {"stellar.table": "selection"})
        obs = pc.not_equal(t["split"], "train").to_numpy(zero_copy_only=False)
        out.append({"part": p, "rows": t.num_rows, "observed": int(obs.sum()),
                    "observed_train_unlike": int((obs & (score[sl] < ref.threshold)).sum()),
                    "placed": int(rest[sl].sum())})
    # task time split (first part of the group carries it): where placement time goes
    out[0].update({"task_seconds": time.perf_counter() - t0, "map_load_seconds": t_load,
                   "transform_seconds": t_transform})
    return out


def select(cfg: SelectConfig, features_root: str, mapper: Executor | None = None) -> dict:
    """Run the selection stage; returns the summary. Holds the selection store's writer lock throughout
    (:class:`stellar.stage.StoreRun`)."""
    t0 = time.perf_counter()
    fstore = TableStore(features_root)
    fversion = fstore.current_version()
    if fversion is None:
        raise SelectError(f"no features under {features_root} (run 'stellar preprocess' first)")
    digest = settings_hash({"cfg": cfg.model_dump(exclude={"output_dir"}), "features": fversion, "v": __version__})
    with StoreRun("select", cfg.output_dir, digest) as run:
        cur = run.committed()
        if cur:
            return {**cur, "up_to_date": True}
        return _build(run, cfg, features_root, fstore, fversion, mapper or LOCAL, t0)


def run(cfg: StellarConfig, instrument=None, executor: Executor | None = None) -> StageResult:
    """The stage contract (:mod:`stellar.stage`): the map and train-like flags of the committed features."""
    return StageResult.from_summary("select", select(cfg.select, cfg.preprocess.output_dir, mapper=executor))


def _build(run: StoreRun, cfg: SelectConfig, features_root: str, fstore: TableStore, fversion: str,
           mapper: Executor, t0: float) -> dict:
    store = run.store
    stats = load_stats(features_root)
    manifest = fstore.current_manifest()
    t_fit = time.perf_counter()
    fmap, fit = fit_map(cfg, features_root, stats)
    t_fit = time.perf_counter() - t_fit
    version = run.new_version()
    vdir_in = fstore.root / fversion
    parts = sorted(str(p.relative_to(vdir_in / "features")) for p in (vdir_in / "features").rglob("part-*.parquet"))
    ctx = Ctx(str(vdir_in), str(store.root / version), stats)
    # Groups of consecutive partitions with >= place_batch stars each: one transform call per group
    # (it has a high fixed cost), and groups fixed by the data, not by the cluster, so the map
    # placement is the same on any number of executors.
    groups: list[list[str]] = [[]]
    count = 0
    for p in parts:
        if count >= cfg.place_batch:
            groups.append([])
            count = 0
        groups[-1].append(p)
        count += pq.read_metadata(vdir_in / "features" / p).num_rows
    t_place = time.perf_counter()
    fmap.reference.prepare()  # build the reference index once, here, not in every executor
    shared = mapper.share(fmap)  # the fitted map (~100 MB) travels once, not in every task
    results = [r for g in mapper.map(lambda grp: place_group(grp, shared, ctx), groups) for r in g]
    if hasattr(shared, "unpersist"):
        shared.unpersist()
    t_place = time.perf_counter() - t_place
    c = Counter()
    for r in results:
        c.update({k: v for k, v in r.items() if k != "part"})
    n_features = manifest["summary"]["counts"]["stars"]
    if c["rows"] != n_features:
        raise SelectError(f"row accounting: {n_features} feature rows, {c['rows']} selection rows")
    summary = {"version": version, "features_version": fversion, "settings_digest": run.digest, "method": cfg.method,
               "rows": c["rows"],
               "fit_set": len(fmap.ref_xy), "fit_training": int(fmap.ref_is_train.sum()), "placed": c["placed"],
               "observed": c["observed"], "observed_train_unlike": c["observed_train_unlike"],
               "fit_seconds": round(t_fit, 2), "place_seconds": round(t_place, 2), "groups": len(groups),
               **{k: round(c[k], 2) for k in ("task_seconds", "map_load_seconds", "transform_seconds")},
               "seconds": round(time.perf_counter() - t0, 2)}
    for name, blob in fmap.reference.to_files().items():  # the map itself, for the model to carry
        (store.root / version / name).write_bytes(blob)
    _figure(store.root / version / "map.png", store.root / version / "selection")
    return run.commit(summary, fstore.healpix_order())


def _figure(path: Path, table_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = ds.dataset(table_dir, format="parquet", partitioning="hive").to_table(
        columns=["x", "y", "train_like", "split"])
    x, y = t["x"].to_numpy(), t["y"].to_numpy()
    train = pc.equal(t["split"], "train").to_numpy(zero_copy_only=False)
    like = t["train_like"].to_numpy(zero_copy_only=False)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    axes[0].scatter(x[~train], y[~train], s=1, c="0.6", label="observed")
    axes[0].scatter(x[train], y[train], s=1, c="C0", label="training")
    axes[0].legend(markerscale=8, fontsize=8)
    axes[0].set_title("training vs observed")
    axes[1].scatter(x[~train & like], y[~train & like], s=1, c="C2", label="observed, train-like")
    axes[1].scatter(x[~train & ~like], y[~train & ~like], s=1, c="C3", label="observed, train-unlike")
    axes[1].legend(markerscale=8, fontsize=8)
    axes[1].set_title("train-like flag")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
