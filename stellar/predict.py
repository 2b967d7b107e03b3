"""The predict stage: a registered ensemble applied to every star of the features table.

The model is resolved once, on the driver: ``models:/<name>@<alias>`` (or a
version number) becomes a concrete version whose files (safetensors weights,
JSON config, normalisation statistics) are fetched once and shipped to the
executors as one broadcast. Every output row, and the table's manifest,
record that name, version and run id, so a rerun after the alias moved can
name the exact model.

Every features part is one item of the stage's ``runtime.Executor`` (Spark tasks
or this process: the same code path). A task reads its part and the selection
part at the same relative path with pyarrow, and each Python worker builds the
ensemble once (cached across tasks), uses as many torch threads as its task
has CPUs, runs on the task's GPU when Spark assigned one, and evaluates all
members on each sub-batch in one pass. It writes the predictions part at the same
path (deterministic names and content: a retried task rewrites the same file).
The ``predictions`` table (partitioned by hpx like the features)
holds per label the mean and calibrated uncertainty, the train-like flag and
score from the ``selection`` table, an outside-the-training-range bit mask
and the quality bits; unusable feature rows get no prediction, a ``problem``
text, and a row in ``quarantine``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from stellar import __version__
from stellar.columns import with_field_metadata
from stellar.config import PredictConfig, StellarConfig
from stellar.devices import pick_device
from stellar.errors import StellarError
from stellar.mapping import MAP_FILE
from stellar.inference_core import arrow_features, features_to_tensors, forward_members
from stellar.model import StackedEnsemble
from stellar.numerics import with_one_blas_thread
from stellar.stage import StageResult, StoreRun
from stellar.runtime import LOCAL, Executor, SparkExecutor
from stellar.tables import TableStore, load_stats, settings_hash, write_part
from stellar.ensemble import Ensemble
from stellar.trust import OOD_BITS, assess, blocks_read

PASS_THROUGH = ("source_id", "hpx", "split", "snr", "quality")


class PredictError(StellarError):
    """A predict run that cannot go on: no features, a selection of other features, no feature parts, or
    row accounting that does not add up."""
    pass


@dataclass(frozen=True)
class ModelBundle:
    """A resolved model version and its files: what the driver ships to the executors."""

    name: str
    version: int
    run_id: str
    files: dict[str, bytes] = field(repr=False)

    @cached_property
    def digest(self) -> str:
        """A short hash of the model's files: the key of the worker's predictor cache and part of the
        predictions' settings digest."""
        h = hashlib.sha256()
        for k in sorted(self.files):
            h.update(k.encode())
            h.update(hashlib.sha256(self.files[k]).digest())
        return h.hexdigest()[:16]

    @property
    def labels(self) -> list[str]:
        """The ensemble's label names, from its ``ensemble.json``."""
        return json.loads(self.files["ensemble.json"])["labels"]

    def identity(self) -> dict:
        """Name, version, run id and digest: what the predictions' rows and manifest record of the model."""
        return {"name": self.name, "version": self.version, "run_id": self.run_id, "digest": self.digest}

    @property
    def stats(self) -> dict:
        """The normalisation statistics the model was trained with (its ``stats.json``)."""
        return json.loads(self.files["stats.json"])

    def ensemble(self) -> Ensemble:
        """The :class:`~stellar.ensemble.Ensemble` built from the files (once per worker, by
        :func:`worker_predictor`)."""
        return Ensemble.from_files(self.files)


def resolve_model(cfg: StellarConfig, alias_or_version: str | None = None) -> ModelBundle:
    """Resolve the alias to a version once and fetch its files (pickle-free)."""
    from stellar.registry import load_registered

    ens, info = load_registered(cfg, alias_or_version or cfg.predict.model)
    return ModelBundle(info["name"], info["version"], info["run_id"], ens.to_files())


def output_schema(labels: list[str]) -> pa.Schema:
    """The ``predictions`` schema for ``labels``: pass-through columns, each label's mean and uncertainty,
    the out-of-range bits, the problem text, the map's verdict and score, the chi-squares and the ood
    flags (the model columns are appended when the table is written)."""
    fields = [pa.field("source_id", pa.int64()), pa.field("hpx", pa.int32()), pa.field("split", pa.string()),
              pa.field("snr", pa.float32()), pa.field("quality", pa.int32())]
    for lab in labels:
        fields += [pa.field(lab, pa.float32()), pa.field(f"{lab}_err", pa.float32())]
    fields += [pa.field("out_of_range", pa.int32()), pa.field("problem", pa.string()),
               pa.field("train_like", pa.bool_()), pa.field("selection_score", pa.float32()),
               pa.field("spectrum_chi2", pa.float32()), pa.field("line_chi2", pa.float32()),
               pa.field("line_broadening", pa.float32()),
               pa.field("ood", pa.bool_()), pa.field("ood_reason", pa.int32())]
    return pa.schema(fields)


class BatchPredictor:
    """An ensemble on one device turning feature batches into prediction batches (vectorised)."""

    def __init__(self, ens: Ensemble, device: torch.device, chunk: int, precision: str = "fp32",
                 amp_tolerance: float = 0.02):
        self.ens = ens
        self.stacked = StackedEnsemble(ens.nets).to(device).eval()  # all members in one pass
        self.device = device
        self.chunk = chunk
        self.labels = ens.labels
        self.schema = output_schema(self.labels)
        idx = [ens.stats["label_names"].index(k) for k in self.labels]
        self.lo = np.asarray(ens.stats["labels"]["min"], dtype=np.float64)[idx]
        self.hi = np.asarray(ens.stats["labels"]["max"], dtype=np.float64)[idx]
        self.amp_tolerance = amp_tolerance
        # auto: decided on the first sub-batch (fp16 on GPU only if it agrees with fp32)
        self.dtype: torch.dtype | None = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.decided = precision != "auto" or device.type != "cuda"
        self.amp_deviation: float | None = None
        self.reads = blocks_read(ens.cfg.use_xp, ens.cfg.use_scalars)

    @property
    def precision(self) -> str:
        """The precision in use: fp32, fp16 or bf16 (``auto`` reads fp32 until the first sub-batch decides)."""
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def check_mixed_precision(self, data: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
        """Largest |mixed - fp32| of a predicted mean in units of its sigma, on up to one sub-batch."""
        head = {k: v[: self.chunk] for k, v in data.items()}
        ref = self.ens.combine(*forward_members(self.stacked, head, self.device, self.chunk, None))
        mixed = self.ens.combine(*forward_members(self.stacked, head, self.device, self.chunk, dtype))
        dev = np.abs(mixed["mean"] - ref["mean"]) / ref["sigma"]
        return float(np.nanmax(dev)) if dev.size else 0.0

    def predict_arrays(self, arrays: dict[str, np.ndarray], snr: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Labels, calibrated uncertainties (as a function of S/N where ``snr`` is given), the members' spread and
        the normalised inputs the trust tests read."""
        data = features_to_tensors(self.ens.stats, arrays)
        if not self.decided and len(arrays["spectrum"]):
            self.amp_deviation = self.check_mixed_precision(data, torch.float16)
            self.dtype = torch.float16 if self.amp_deviation <= self.amp_tolerance else None
            self.decided = True
            print(f"stellar predict: {self.device} precision {self.precision} (fp16 deviation "
                  f"{self.amp_deviation:.2g} sigma, tolerance {self.amp_tolerance})", file=sys.stderr)
        means, variances = forward_members(self.stacked, data, self.device, self.chunk, self.dtype)
        out = self.ens.combine(means, variances, snr=snr)
        out["xp_norm"], out["scalars_norm"] = data["xp"].numpy(), data["scalars"].numpy()
        if "spectrum_error" in arrays:
            out["spectrum_chi2"], out["line_chi2"], out["line_broadening"] = self.ens.consistency(out["mean"], arrays)
        return out

    def predict_batch(self, batch: pa.RecordBatch | pa.Table, selection: pa.Table | None = None) -> pa.RecordBatch:
        """One batch of feature rows -> prediction rows, with the map's verdict from ``selection`` (the
        selection table's rows of the same partition) and the trust tests (stellar.trust)."""
        n = batch.num_rows
        arrays, problem = arrow_features(batch, self.ens.stats)
        ok = problem == ""
        n_lab = len(self.labels)
        mean = np.full((n, n_lab), np.nan)
        sigma = np.full((n, n_lab), np.nan)
        cols = {name: _column(batch, name, self.schema.field(name).type) for name in PASS_THROUGH}
        train_like, score = _selection_of(cols["source_id"], selection)
        reason = np.zeros(n, dtype=np.int32)
        withheld = np.zeros((n, n_lab), dtype=bool)
        chi2 = np.full(n, np.nan)
        line = np.full(n, np.nan)
        broad = np.full(n, np.nan)
        if ok.any():
            sub = {k: v[ok] for k, v in arrays.items()}
            snr = pc.fill_null(cols["snr"], np.nan).to_numpy(zero_copy_only=False)[ok]
            out = self.predict_arrays(sub, snr)
            mean[ok], sigma[ok] = out["mean"], out["sigma"]
            quality = pc.fill_null(cols["quality"], 0).to_numpy(zero_copy_only=False)[ok]
            tl = pc.fill_null(train_like.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)[ok]
            msc = pc.fill_null(score.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)[ok]
            if out.get("spectrum_chi2") is not None:
                chi2[ok], line[ok], broad[ok] = out["spectrum_chi2"], out["line_chi2"], out["line_broadening"]
            reason[ok], withheld[ok] = assess(self.ens.stats, self.ens.trust, self.labels, out["xp_norm"],
                                              out["scalars_norm"], quality, out["mean"], out["epistemic_norm"], tl,
                                              self.reads, out.get("spectrum_chi2"), out.get("line_chi2"), snr, msc,
                                              out["sigma_norm"], out["sigma"],
                                              line_broadening=out.get("line_broadening"))
        outside = ((mean < self.lo) | (mean > self.hi)) & ok[:, None]
        bits = (outside * (1 << np.arange(n_lab))).sum(axis=1).astype(np.int32)
        for j, lab in enumerate(self.labels):
            hide = ~ok | withheld[:, j]  # never publish a value outside the physical envelope
            cols[lab] = pa.array(mean[:, j].astype(np.float32), mask=hide)
            cols[f"{lab}_err"] = pa.array(sigma[:, j].astype(np.float32), mask=hide)
        cols["out_of_range"] = pa.array(bits)
        cols["problem"] = pa.array(problem, pa.string(), mask=ok)
        cols["train_like"] = train_like
        cols["selection_score"] = score
        cols["spectrum_chi2"] = pa.array(chi2.astype(np.float32), mask=~np.isfinite(chi2))
        cols["line_chi2"] = pa.array(line.astype(np.float32), mask=~np.isfinite(line))
        cols["line_broadening"] = pa.array(broad.astype(np.float32), mask=~np.isfinite(broad))
        cols["ood"] = pa.array(reason != 0, mask=~ok)
        cols["ood_reason"] = pa.array(reason, mask=~ok)
        return pa.RecordBatch.from_pydict(cols, schema=self.schema)


def _selection_of(source_id: pa.Array, selection: pa.Table | None) -> tuple[pa.Array, pa.Array]:
    """train_like and score of each star from its partition's selection rows (null where it has none)."""
    n = len(source_id)
    if selection is None:
        return pa.nulls(n, pa.bool_()), pa.nulls(n, pa.float32())
    pos = pc.index_in(source_id, value_set=selection["source_id"])
    return (pc.take(selection["train_like"], pos).combine_chunks(),
            pc.take(selection["score"], pos).combine_chunks().cast(pa.float32()))


def _column(batch, name: str, typ: pa.DataType) -> pa.Array:
    if name not in batch.schema.names:
        return pa.nulls(batch.num_rows, typ)
    col = batch.column(name)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.cast(typ)


# One predictor per (model, device, settings) per Python worker: Spark reuses workers across tasks,
# so the ensemble is built once per worker, not once per task or batch.
_PREDICTORS: dict[tuple, BatchPredictor] = {}


def worker_predictor(bundle: ModelBundle, pcfg: PredictConfig) -> BatchPredictor:
    """This Python worker's :class:`BatchPredictor` for the bundle and settings, built once and reused
    across tasks (one model at a time); torch gets as many threads as the Spark task has CPUs."""
    from stellar.devices import task_cpus

    threads = task_cpus()
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(pcfg.device)
    key = (bundle.digest, str(device), pcfg.precision, pcfg.amp_tolerance, pcfg.batch_size, pcfg.gpu_batch_size)
    if key not in _PREDICTORS:
        _PREDICTORS.clear()  # one model at a time per worker: bounded memory
        chunk = pcfg.gpu_batch_size if device.type == "cuda" else pcfg.batch_size
        _PREDICTORS[key] = BatchPredictor(bundle.ensemble(), device, chunk, pcfg.precision, pcfg.amp_tolerance)
    return _PREDICTORS[key]


# --- the stage -----------------------------------------------------------------------------------

def _features_version(features_root: str) -> tuple[TableStore, str]:
    store = TableStore(features_root)
    v = store.current_version()
    if v is None:
        raise PredictError(f"no features under {features_root} (run 'stellar preprocess' first)")
    return store, v


def _selection_dir(cfg: StellarConfig, features_version: str) -> tuple[Path | None, str | None]:
    store = TableStore(cfg.select.output_dir)
    man = store.current_manifest()
    if man is None:
        return None, None
    fv = man.get("summary", {}).get("features_version")
    if fv != features_version:
        raise PredictError(f"the selection in {cfg.select.output_dir} was made from features {fv}, the features "
                           f"are now {features_version}: run 'stellar select' first")
    return store.root / store.current_version() / "selection", store.current_version()


def check_inputs_match(bundle: ModelBundle, feature_stats: dict, where: str) -> None:
    """Refuse, before any task runs, features shaped for another model: a champion trained on features
    of another stellar version (another scalar set, rebinning or XP truncation) would otherwise send
    every row to quarantine, one "not N values" line per star. One line names both and the cure."""
    model = bundle.stats
    for key in ("scalar_names", "n_spectrum", "xp_bases"):
        if model.get(key) != feature_stats.get(key):
            raise PredictError(
                f"{bundle.name} v{bundle.version} reads {key} {model.get(key)} but the features in {where} hold "
                f"{feature_stats.get(key)}: they were written by another stellar version or preprocess setting; "
                "retrain on these features (stellar train) or predict with a model trained on them")


def predict(cfg: StellarConfig, bundle: ModelBundle | None = None, spark=None,
            mapper: Executor | None = None) -> dict:
    """Predict every star of the current features with ``bundle`` (resolved from cfg.predict.model when None).

    The parts are scored as tasks of ``mapper`` (default: Spark tasks of ``spark`` when given, else this
    process). Holds the predictions store's writer lock throughout (:class:`stellar.stage.StoreRun`)."""
    t0 = time.perf_counter()
    mapper = mapper or (SparkExecutor(spark, "stellar predict") if spark is not None else LOCAL)
    fstore, fversion = _features_version(cfg.preprocess.output_dir)
    sel_dir, sel_version = _selection_dir(cfg, fversion)
    bundle = bundle or resolve_model(cfg)
    check_inputs_match(bundle, load_stats(cfg.preprocess.output_dir), f"{fstore.root / fversion}")
    digest = settings_hash({"model": bundle.digest, "features": fversion, "selection": sel_version,
                            "cfg": cfg.predict.model_dump(exclude={"output_dir", "model"}), "v": __version__})
    with StoreRun("predict", cfg.predict.output_dir, digest) as run:
        cur = run.committed()
        if cur:
            return {**cur, "up_to_date": True}
        version = run.new_version()
        out_dir = run.store.root / version / "predictions"
        _predict_parts(mapper, bundle, cfg.predict, fstore.root / fversion / "features", sel_dir, out_dir)
        summary = _account(out_dir, run.store.root / version, fstore.current_manifest()["summary"]["counts"]["stars"])
        summary.update({"version": version, "features_version": fversion, "selection_version": sel_version,
                        # where train_like comes from: this run's selection, the model's own map, or nowhere
                        "map_source": "selection" if sel_dir else ("model" if MAP_FILE in bundle.files else "none"),
                        "model": bundle.identity(), "labels": bundle.labels, "settings_digest": digest,
                        "seconds": round(time.perf_counter() - t0, 2)})
        return run.commit(summary, fstore.healpix_order(), model=bundle.identity(),
                          columns=output_schema(bundle.labels).names + ["model_name", "model_version", "model_run_id"])


def run(cfg: StellarConfig, instrument=None, executor: Executor | None = None, spark=None) -> StageResult:
    """The stage contract (:mod:`stellar.stage`): the champion (``predict.model``) on the committed features."""
    return StageResult.from_summary("predict", predict(cfg, resolve_model(cfg), spark=spark, mapper=executor))


def _identity_columns(table: pa.Table, bundle: ModelBundle) -> pa.Table:
    """The model's identity on every row, typed as the table has always had it (plain non-null string
    and int32 columns: Parquet dictionary-encodes the repeated values on disk anyway)."""
    n = table.num_rows
    table = table.append_column(pa.field("model_name", pa.string(), nullable=False),
                                pa.repeat(pa.scalar(bundle.name, pa.string()), n))
    table = table.append_column(pa.field("model_version", pa.int32(), nullable=False),
                                pa.array(np.full(n, bundle.version, np.int32)))
    return table.append_column(pa.field("model_run_id", pa.string(), nullable=False),
                               pa.repeat(pa.scalar(bundle.run_id, pa.string()), n))


FEATURE_COLUMNS = ["source_id", "split", "snr", "quality", "spectrum", "spectrum_error", "spectrum_mask", "xp",
                   "scalars"]


def predict_part(predictor: BatchPredictor, features_dir: str, rel: str, batch_rows: int,
                 selection_dir: str | None = None):
    """Prediction batches of one features part, read straight from Parquet by pyarrow (zero-copy
    into numpy; no JVM row conversion of the 1,700 array values per star). The selection table shares
    the features' HEALPix partitioning, so the part's map flags come from the same relative path:
    one per-partition path for local and Spark runs, no shuffle join."""
    hpx = int(Path(rel).parts[0].split("=", 1)[1])
    sel_part = Path(selection_dir) / rel if selection_dir else None
    selection = pq.read_table(sel_part, columns=["source_id", "train_like", "score"]) \
        if sel_part is not None and sel_part.exists() else None
    path = Path(features_dir) / rel
    if selection_dir is None and predictor.ens.selection_map is not None:
        # no selection of these features: the model's own map, placed from the same read of the part
        table = pq.read_table(path, columns=FEATURE_COLUMNS)
        selection = model_map_selection(predictor.ens, table)
        batches = table.to_batches(max_chunksize=batch_rows)
    else:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=FEATURE_COLUMNS)
    for batch in batches:
        batch = batch.append_column("hpx", pa.array(np.full(batch.num_rows, hpx, np.int32)))
        yield predictor.predict_batch(batch, selection)


@with_one_blas_thread  # t-SNE placement under the selection stage's thread policy (stellar.numerics)
def model_map_selection(ens: Ensemble, features: pa.Table) -> pa.Table:
    """The map verdict (source_id, train_like, score) of stars that have no selection of their own
    features, from the training run's map the model carries: how a survey the model never saw (no
    labels, no select stage) gets ``train_like`` and the map test of ``ood``."""
    n = features.num_rows
    sid = features["source_id"].to_numpy()
    spectrum = features["spectrum"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
    xp = features["xp"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
    score, like = ens.selection_map.verdict(spectrum, xp, ens.stats, sid)
    return pa.table({"source_id": pa.array(sid), "train_like": pa.array(like),
                     "score": pa.array(score.astype(np.float32))})


def _parts(features_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(features_dir)) for p in features_dir.rglob("part-*.parquet"))


def _predict_parts(executor: Executor, bundle: ModelBundle, pcfg: PredictConfig, features_dir: Path,
                   sel_dir: Path | None, out_dir: Path) -> None:
    """Score every features part as a task of ``executor`` (in this process or as Spark tasks: one path).

    The bundle (safetensors bytes and JSON) travels once per worker (``executor.share``); each worker
    builds its stacked ensemble once (``worker_predictor`` caches it) on the device Spark gave its task.
    A task reads its features part and the selection part at the same relative path with pyarrow
    (no JVM row conversion of the ~1,700 array values per star, no shuffle join) and writes the
    predictions part at that path, with the model's identity in every row: deterministic names and
    content, so a retried task (a lost worker) rewrites the same file."""
    parts = _parts(features_dir)
    if not parts:
        raise PredictError(f"no feature parts under {features_dir}")
    shared = executor.share(bundle)
    fdir, sdir, odir = str(features_dir), str(sel_dir) if sel_dir else None, str(out_dir)
    rows = pcfg.arrow_batch_rows
    n_tasks = min(len(parts), 4 * executor.parallelism)
    groups = [parts[i::n_tasks] for i in range(n_tasks)]

    def work(group: list[str]) -> int:
        b = shared.value
        predictor = worker_predictor(b, pcfg)
        for rel in group:
            table = pa.Table.from_batches(list(predict_part(predictor, fdir, rel, rows, sdir)), schema=predictor.schema)
            table = with_field_metadata(_identity_columns(table, b).drop_columns(["hpx"]), b.labels)
            write_part(Path(odir) / rel, table, {"stellar.table": "predictions",
                                                 "stellar.model": json.dumps(b.identity())})
        return len(group)

    done = sum(executor.map(work, groups))
    if hasattr(shared, "unpersist"):
        shared.unpersist()
    if done != len(parts):
        raise PredictError(f"{done} of {len(parts)} feature parts were scored")


def _account(out_dir: Path, vdir: Path, n_features: int) -> dict:
    """Counts from the written table; every feature row must have exactly one prediction row."""
    dataset = ds.dataset(out_dir, format="parquet", partitioning="hive")
    n = dataset.count_rows()
    if n != n_features:
        raise PredictError(f"row accounting: {n_features} feature rows, {n} prediction rows in {out_dir}")
    bad = dataset.to_table(columns=["source_id", "hpx", "problem"], filter=pc.field("problem").is_valid())
    if bad.num_rows:
        write_part(vdir / "quarantine" / "part-000000.parquet", bad, {"stellar.table": "predict_quarantine"})
    flags = dataset.to_table(columns=["train_like", "out_of_range", "ood", "ood_reason"])
    train_like = flags["train_like"]
    problems = {}
    if bad.num_rows:
        kinds, counts = np.unique(bad["problem"].to_numpy(zero_copy_only=False).astype(str), return_counts=True)
        problems = {str(k): int(c) for k, c in zip(kinds, counts)}
    return {"rows": n, "predicted": n - bad.num_rows, "quarantined": bad.num_rows, "problems": problems,
            "train_like": int(pc.sum(pc.fill_null(train_like, False).cast(pa.int64())).as_py() or 0),
            "train_unlike": int(pc.sum(pc.invert(pc.fill_null(train_like, True)).cast(pa.int64())).as_py() or 0),
            "no_selection": train_like.null_count,
            "out_of_range": int(pc.sum(pc.not_equal(flags["out_of_range"], 0).cast(pa.int64())).as_py() or 0),
            "ood": int(pc.sum(pc.fill_null(flags["ood"], False).cast(pa.int64())).as_py() or 0),
            "ood_by_reason": _reason_counts(flags["ood_reason"])}


def _reason_counts(reason: pa.ChunkedArray) -> dict[str, int]:
    """How many stars each ood_reason bit flags (a star can carry several)."""
    r = pc.fill_null(reason, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return {name: int(((r & bit) != 0).sum()) for name, (bit, _) in OOD_BITS.items()}
