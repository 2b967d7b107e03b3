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
from stellar.features import Normaliser, split_hash
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
    """The map's input per star: the rebinned spectrum minus 1, with (``use_xp``) the z-scored XP
    coefficients appended at a tenth of their weight."""
    spec = _matrix(table["spectrum"], table.num_rows).astype(np.float32) - 1.0
    if not use_xp:
        return spec
    xp = Normaliser.from_stats(stats["xp"]).normalise(_matrix(table["xp"], table.num_rows))
    return np.concatenate([spec, 0.1 * xp], axis=1)


@dataclass
class FittedMap:
    """This run's fitted map: the PCA (mean, components), the 2-D embedding, the fit set's coordinates on
    it and which fit-set stars are training stars."""

    pca_mean: np.ndarray
    pca_components: np.ndarray
    embedding: object  # openTSNE TSNEEmbedding or umap.UMAP (this run's own object)
    ref_xy: np.ndarray  # fit-set coordinates
    ref_is_train: np.ndarray
    method: str

    def project(self, x: np.ndarray) -> np.ndarray:
        """Features -> coordinates in the fitted PCA basis (the embedding's input)."""
        return (x - self.pca_mean) @ self.pca_components.T

    def place(self, z: np.ndarray) -> np.ndarray:
        """Place new points on the map. A fresh copy of the fitted embedding per call: transform
        keeps optimiser state in it, and each group must start from the same state wherever it runs."""
        if len(z) == 0:
            return np.zeros((0, 2))
        # pickle round trip of this run's own object (deepcopy drops the ndarray subclass's state)
        fresh = pickle.loads(pickle.dumps(self.embedding))  # noqa: S301 - our own in-memory object
        return np.asarray(fresh.transform(z))


def scores(fmap: FittedMap, xy: np.ndarray, k: int) -> np.ndarray:
    """Share of training stars among the k nearest fit-set stars on the map, relative to their share
    in the whole fit set: ~1 where training stars are as common as anywhere, 0 where there are none.
    (Relative, so the threshold does not depend on how many observed stars were sampled.)"""
    from scipy.spatial import cKDTree

    tree = cKDTree(fmap.ref_xy)
    _, idx = tree.query(xy, k=k)
    return fmap.ref_is_train[idx].mean(axis=1) / max(fmap.ref_is_train.mean(), 1e-9)


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
    if cfg.method == "tsne":
        from openTSNE import TSNE

        # exact neighbours: the approximate index (Annoy) is rebuilt differently in each worker process,
        # which would make a star's placement depend on where it ran
        emb = TSNE(perplexity=cfg.perplexity, n_jobs=1, random_state=cfg.seed, neighbors="exact",
                   verbose=False).fit(z)
        # placement by FFT interpolation whatever the group size: openTSNE's "auto" takes Barnes-Hut
        # below 10,000 points, several times slower for the same result
        emb.gradient_descent_params["negative_gradient_method"] = cfg.place_gradient
        xy = np.asarray(emb)
    else:
        import umap

        emb = umap.UMAP(n_neighbors=cfg.perplexity, random_state=cfg.seed, n_jobs=1).fit(z)
        xy = emb.embedding_
    fmap = FittedMap(pca.mean_, pca.components_, emb, xy, is_train, cfg.method)
    return fmap, fit


@dataclass(frozen=True)
class Ctx:
    """What every placement task needs: the features and output version folders, whether XP is embedded,
    k and the train-like threshold, and the normalisation statistics."""

    features_vdir: str
    out_vdir: str
    use_xp: bool
    k: int
    threshold: float
    stats: dict


@with_one_blas_thread
def place_group(parts: list[str], shared, ctx: Ctx) -> list[dict]:
    """Place the stars of several partitions with one ``transform`` call (it has a high fixed cost).
    ``shared.value`` is (fitted map, sorted fit-set ids), shipped to each executor once."""
    t0 = time.perf_counter()
    fmap, fit_ids = shared.value
    t_load = time.perf_counter() - t0
    tables = [pq.read_table(Path(ctx.features_vdir) / "features" / p, columns=["source_id", "spectrum", "xp", "split"])
              for p in parts]
    if not tables:
        return []
    allt = pa.concat_tables(tables)
    sid = allt["source_id"].to_numpy()
    pos = np.minimum(np.searchsorted(fit_ids, sid), max(len(fit_ids) - 1, 0))
    in_fit = (fit_ids[pos] == sid) if len(fit_ids) else np.zeros(len(sid), bool)
    xy = np.zeros((len(sid), 2))
    xy[in_fit] = fmap.ref_xy[pos[in_fit]]
    rest = ~in_fit
    t1 = time.perf_counter()
    if rest.any():
        xy[rest] = fmap.place(fmap.project(feature_matrix(allt.filter(pa.array(rest)), ctx.stats, ctx.use_xp)))
    t_transform = time.perf_counter() - t1
    score = scores(fmap, xy, ctx.k)
    out = []
    lo = 0
    for p, t in zip(parts, tables):
        sl = slice(lo, lo + t.num_rows)
        lo += t.num_rows
        table = pa.table({"source_id": pa.array(sid[sl]), "x": pa.array(xy[sl, 0].astype(np.float32)),
                          "y": pa.array(xy[sl, 1].astype(np.float32)), "score": pa.array(score[sl].astype(np.float32)),
                          "train_like": pa.array(score[sl] >= ctx.threshold), "in_fit": pa.array(in_fit[sl]),
                          "split": t["split"]})
        write_part(Path(ctx.out_vdir) / "selection" / p, table, {"stellar.table": "selection"})
        obs = pc.not_equal(t["split"], "train").to_numpy(zero_copy_only=False)
        out.append({"part": p, "rows": t.num_rows, "observed": int(obs.sum()),
                    "observed_train_unlike": int((obs & (score[sl] < ctx.threshold)).sum()),
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
    ctx = Ctx(str(vdir_in), str(store.root / version), cfg.use_xp, cfg.neighbours, cfg.threshold, stats)
    fit_ids = fit["source_id"].to_numpy()
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
    shared = mapper.share((fmap, fit_ids))  # the fitted map (~100 MB) travels once, not in every task
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
    summary = {"version": version, "features_version": fversion, "settings_digest": run.digest, "rows": c["rows"],
               "fit_set": len(fit_ids), "fit_training": int(fmap.ref_is_train.sum()), "placed": c["placed"],
               "observed": c["observed"], "observed_train_unlike": c["observed_train_unlike"],
               "fit_seconds": round(t_fit, 2), "place_seconds": round(t_place, 2), "groups": len(groups),
               **{k: round(c[k], 2) for k in ("task_seconds", "map_load_seconds", "transform_seconds")},
               "seconds": round(time.perf_counter() - t0, 2)}
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
