"""Speed of the predict job (Parquet in -> Parquet out) against a bare-torch forward of the same ensemble.

    .venv/bin/python benchmarks/inference.py [--stars 100000] [--work DIR] [--members 5] [--device auto]

Builds (or reuses, with --work) a generated survey through preprocess and select,
and a 5-member hybrid ensemble with seeded random weights (speed does not
depend on the weight values, so no training is needed; the job receives it
exactly as a resolved registry version). Then, in the same run:
  * bare torch: the features read into memory first (not timed), then every
    member's forward over all stars in sub-batches of 64, members one after
    another, torch.inference_mode, all CPU threads: stars/s;
  * the stacked forward used by the job (all members as one network), same data;
  * the predict job, Spark local[*] (each features part a Spark task: read it and its
    selection part with pyarrow, forward, write the predictions part): stars/s and the
    ratio to bare torch (targets: >= 0.7x and >= 10,000 stars/s on 2 cores);
  * the same job without Spark (one process);
  * the Spark job again with an ensemble without the spectrum-consistency emulator, to show what
    the check (emulated spectrum, spectrum_chi2, line_chi2 and line_broadening per star) costs;
  * the Python API (``stellar.api.StellarModel.predict``) on the stars' archive arrays held in memory
    (2401-pixel spectra, XP coefficients, astrometry; read before timing), in calls of 20,000 stars:
    features from raw, the map placement on the model's stored t-SNE map, forward, trust tests;
  * the pyspark.ml ``StellarTransformer`` on a DataFrame of the same archive columns (Spark local[*],
    Parquet in, a no-op sink out).
The ensemble carries an emulator fitted on the survey's training stars and trust thresholds fitted
on its validation stars, as a trained one does.
Measurements are interleaved over --rounds rounds and the best of each is printed (shared
machines change speed over tens of seconds). On a GPU machine --device cuda measures there
(name the card with the figure).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stellar.config import TrainConfig, load_config  # noqa: E402
from stellar.devices import pick_device  # noqa: E402
from stellar.inference_core import features_to_tensors, forward_members  # noqa: E402
from stellar.model import StackedEnsemble  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.model import load_model_preset  # noqa: E402
from stellar.predict import ModelBundle, predict  # noqa: E402
from stellar.tables import load_stats  # noqa: E402
from stellar.tables import read_table  # noqa: E402
from stellar.ensemble import Ensemble, build_net  # noqa: E402


def random_ensemble(stats: dict, labels: list[str], members: int, features_root: str | None = None,
                    inst=None) -> Ensemble:
    """Seeded random weights; with ``features_root``, the emulator and trust thresholds fitted as the
    trainer fits them (speed depends on neither's values, but their cost must be in the figure)."""
    from safetensors.torch import save as st_save

    from stellar.emulator import line_window
    from stellar.train import chi2_pool_sample, emulator_sample
    from stellar.ensemble import load_split

    cfg = load_model_preset("hybrid", str(ROOT / "conf"))
    weights = []
    for i in range(members):
        torch.manual_seed(1000 + i)
        weights.append(st_save({k: v.contiguous() for k, v in build_net(cfg, stats, labels).state_dict().items()}))
    ens = Ensemble(cfg, labels, stats, weights)
    if features_root is not None:
        fit_set = emulator_sample(features_root, labels, stats)
        ens.fit_emulator(fit_set,
                         line_window(stats["wavelength"], [(ln.wavelength, ln.strength) for ln in inst.lines
                                                             if ln.kind != "dib"]))
        train = TrainConfig()  # the trainer's defaults: budget and precision limits (the imprecise bit)
        val = load_split(features_root, "validation", labels, stats)
        ens.fit_trust(val, train.ood_false_flag_rate, chi2_pool=chi2_pool_sample(fit_set))  # label reference too
        ens.fit_precision(val, ens.flag(val) == 0, train.catastrophic_errors, train.catastrophic_odds)
    return ens


def archive_arrays(cfg, work: Path) -> tuple[dict, Path]:
    """The survey's archive columns, joined on source_id in the features' order: numpy arrays for the
    Python API (in memory) and one Parquet file of the same columns for the Spark transformer."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rvs = read_table(cfg.ingest.output_dir, "rvs", ["source_id", "flux", "flux_error"])
    cols = {"source_id": rvs["source_id"], "flux": rvs["flux"], "flux_error": rvs["flux_error"]}
    for table, names in (("xp", ["bp_coefficients", "rp_coefficients", "bp_n_relevant_bases", "rp_n_relevant_bases"]),
                         ("astrometry", ["parallax", "parallax_error", "phot_g_mean_mag", "phot_bp_mean_mag",
                                         "phot_rp_mean_mag", "phot_g_mean_flux", "rvs_spec_sig_to_noise"])):
        t = read_table(cfg.ingest.output_dir, table, ["source_id"] + names)
        pos = pc.index_in(rvs["source_id"], value_set=t["source_id"])
        cols.update({k: pc.take(t[k], pos) for k in names if k in t.schema.names})
    table = pa.table(cols)
    path = work / "archive-columns.parquet"
    pq.write_table(table, path)
    from stellar.api import _dense

    arrays = {"source_id": table["source_id"].to_numpy()}
    for k in table.column_names[1:]:
        if k.startswith("flux") or k.endswith("coefficients"):
            arrays[k] = _dense(table[k], 2401 if k.startswith("flux") else 55)
        else:
            arrays[k] = pc.fill_null(table[k].cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    arrays["flux"], arrays["flux_error"] = arrays["flux"].astype(np.float32), arrays["flux_error"].astype(np.float32)
    return arrays, path


def build(args, cfg, inst) -> None:
    from stellar.runtime import SparkExecutor
    from stellar.ingest.run import ingest
    from stellar.preprocess import preprocess
    from stellar.selection import select
    from stellar.spark import build_session
    from stellar.synth.survey import run_survey

    spark = build_session(cfg, "bench-inference-build")
    mapper = SparkExecutor(spark, "bench build")
    if not (Path(cfg.work_dir) / "synth" / "survey.json").exists():
        print(f"building a {args.stars}-star survey, its features and selection ...", flush=True)
        run_survey(cfg.synth, inst, executor=SparkExecutor(spark, "stellar synth"))
    ingest(cfg.ingest, inst, cfg.conf_dir, mapper=mapper)
    preprocess(cfg.preprocess, inst, cfg.ingest.output_dir, mapper=mapper)
    select(cfg.select, cfg.preprocess.output_dir, mapper=mapper)
    spark.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=100_000)
    ap.add_argument("--work", default=None)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--no-spark", action="store_true", help="skip the Spark job (e.g. where Java is missing)")
    ap.add_argument("--no-api", action="store_true", help="skip the Python API and Spark transformer figures")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved measurement rounds (best of each)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                    help="predict.precision of the job (bf16 on CPUs with native bf16: faster, not exact)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-inf-"))
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", f"synth.n_stars={args.stars}",
                                                     "synth.stars_per_file=10000", f"predict.device={args.device}"])
    inst = load_instrument(cfg.instrument, cfg.conf_dir)
    if not args.no_spark:
        build(args, cfg, inst)
    stats = load_stats(cfg.preprocess.output_dir)
    ens = random_ensemble(stats, list(inst.labels), args.members, cfg.preprocess.output_dir, inst)
    from stellar.train import selection_table, stored_map
    from stellar.tables import TableStore

    ens.selection_map = stored_map(selection_table(cfg, TableStore(cfg.preprocess.output_dir).current_version())[0])
    bundle = ModelBundle("bench-random", 0, "none", ens.to_files())
    bare_files = {k: v for k, v in ens.to_files().items() if k != "emulator.safetensors"}
    bundle_nocheck = ModelBundle("bench-random-nocheck", 0, "none", bare_files)
    device = pick_device(args.device)

    feats = read_table(cfg.preprocess.output_dir, "features", ["spectrum", "spectrum_mask", "xp", "scalars"])
    n = feats.num_rows
    arrays = {k: feats[k].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
              for k in feats.column_names}
    data = features_to_tensors(stats, arrays)
    nets = [net.to(device) for net in ens.nets]
    chunk = cfg.predict.gpu_batch_size if device.type == "cuda" else cfg.predict.batch_size
    stacked = StackedEnsemble(nets).to(device).eval()
    for model, c in ((nets, 64), (stacked, chunk)):  # warm-up
        forward_members(model, {k: v[:2048] for k, v in data.items()}, device, c)

    def forward(model, c):
        t = time.perf_counter()
        forward_members(model, data, device, c)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    spark = None
    if not args.no_spark:
        from stellar.spark import build_session

        spark = build_session(cfg, "bench-inference")
        spark.sparkContext.parallelize(range(4), 4).map(lambda x: x).collect()  # warm Python workers

    def job(use_spark: bool, check: bool = True) -> float:
        out = work / ("pred-spark" if use_spark else "pred-local")
        shutil.rmtree(out, ignore_errors=True)
        c = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", f"predict.output_dir={out}",
                                                       f"predict.device={args.device}",
                                                       f"predict.precision={args.precision}"])
        t = time.perf_counter()
        s = predict(c, bundle if check else bundle_nocheck, spark=spark if use_spark else None)
        dt = time.perf_counter() - t
        assert s["rows"] == n
        chi2 = read_table(out, "predictions", ["spectrum_chi2"])["spectrum_chi2"]
        assert (chi2.null_count < n) == check, "the consistency check ran iff the model has an emulator"
        return dt

    raw, raw_path = archive_arrays(cfg, work) if not args.no_api else (None, None)

    def api() -> float:
        from stellar.api import StellarModel

        model = StellarModel(Ensemble.from_files(ens.to_files()), {}, args.device)
        t = time.perf_counter()
        step = 20_000
        for lo in range(0, n, step):
            out = model.predict(**{k: v[lo:lo + step] for k, v in raw.items()})
            assert len(out) == min(step, n - lo)
        return time.perf_counter() - t

    def transformer() -> float:
        from stellar.spark_ml import StellarTransformer

        t = time.perf_counter()
        df = spark.read.parquet(str(raw_path))
        StellarTransformer(modelUri=str(work / "bench-model"), device=args.device).transform(df) \
            .write.format("noop").mode("overwrite").save()
        return time.perf_counter() - t

    if raw is not None:
        ens.save(work / "bench-model")

    # Interleaved rounds, best of each: shared machines change speed over tens of seconds, and
    # every figure of a round sees the same machine.
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in (("bare", lambda: forward(nets, 64)), ("stacked", lambda: forward(stacked, chunk)),
                         ("spark", lambda: job(True)), ("local", lambda: job(False)),
                         ("spark_nocheck", lambda: job(True, check=False)), ("api", api),
                         ("spark_transformer", transformer)):
            if name.startswith("spark") and spark is None or name in ("api", "spark_transformer") and raw is None:
                continue
            best[name] = min(best.get(name, float("inf")), fn())
    if spark is not None:
        spark.stop()
    print(f"inference benchmark: {n} stars, {args.members}-member hybrid ensemble, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} torch threads") + f"; job precision {args.precision}; best of "
          f"{args.rounds} interleaved rounds")
    t_bare = best["bare"]
    rows = [("bare torch forward (members in turn, 64/batch)", "bare"),
            (f"stacked forward ({chunk}/batch)", "stacked"),
            ("predict job, Spark local[*], Parquet->Parquet", "spark"),
            ("predict job, one process, Parquet->Parquet", "local"),
            ("predict job, Spark, without the emulator check", "spark_nocheck"),
            ("Python API, archive arrays in memory, with map", "api"),
            ("StellarTransformer, Spark local[*], with map", "spark_transformer")]
    for label, key in rows:
        if key in best:
            dt = best[key]
            print(f"  {label:<48}: {dt:7.2f} s  {n / dt:9.0f} stars/s  {t_bare / dt:5.2f}x bare torch")
    if "spark" in best and "spark_nocheck" in best:
        print(f"  the spectrum-consistency check costs {best['spark'] / best['spark_nocheck'] - 1:+.1%} of the job's time")
    print("  targets: predict job >= 0.7x bare torch and >= 10,000 stars/s on 2 cores (check included)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
