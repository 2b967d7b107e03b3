"""Speed and quality of the training-sample selection stage.

(Named selection.py, not select.py: a script's folder comes first on sys.path, and a
select.py there would shadow the standard library's select module.)

    .venv/bin/python benchmarks/selection.py [--stars 200000] [--work DIR] [--set KEY=VALUE ...]

Builds a generated survey with injected out-of-distribution stars (synth ->
ingest -> preprocess with Spark local[*]; reused when --work already has it),
then runs `stellar select` on Spark and prints, from the same run:
  * the fit (driver: PCA + openTSNE on the training + observed sample) time;
  * the transform (placement on the map, Spark tasks) stars/s;
  * the whole selection time, and a projection to 10^6 stars: the fit set is
    capped by select.train_sample + select.observed_sample, so the fit time
    stays as measured and the placement and I/O scale with the catalogue
    (target < 10 min on this 2-core machine);
  * the share of injected out-of-distribution observed stars flagged
    train-unlike (target >= 90 %) and of in-distribution observed stars
    flagged (target <= 5 %).
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

import pyarrow.parquet as pq  # noqa: E402

from stellar.config import load_config  # noqa: E402
from stellar.runtime import SparkExecutor  # noqa: E402
from stellar.ingest.run import ingest  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.preprocess import preprocess  # noqa: E402
from stellar.selection import select  # noqa: E402
from stellar.spark import build_session  # noqa: E402
from stellar.synth.survey import run_survey  # noqa: E402
from stellar.tables import read_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=200_000)
    ap.add_argument("--work", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set select.observed_sample=8000 (repeatable)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-select-"))
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", f"synth.n_stars={args.stars}",
                                                     "synth.stars_per_file=10000", *args.overrides])
    inst = load_instrument(cfg.instrument, cfg.conf_dir)
    spark = build_session(cfg, "bench-select")
    mapper = SparkExecutor(spark, "bench select")
    if not (work / "synth" / "survey.json").exists():
        print(f"building a {args.stars}-star survey and its features ...", flush=True)
        run_survey(cfg.synth, inst, executor=SparkExecutor(spark, "stellar synth"))
    ingest(cfg.ingest, inst, cfg.conf_dir, mapper=mapper)
    preprocess(cfg.preprocess, inst, cfg.ingest.output_dir, mapper=mapper)
    shutil.rmtree(cfg.select.output_dir, ignore_errors=True)
    spark.sparkContext.parallelize(range(4), 4).map(lambda x: x).collect()  # warm Python workers
    t = time.perf_counter()
    s = select(cfg.select, cfg.preprocess.output_dir, mapper=mapper)
    total = time.perf_counter() - t
    spark.stop()

    sel = read_table(cfg.select.output_dir, "selection").to_pandas().set_index("source_id")
    truth = pq.read_table(work / "synth" / "truth", columns=["source_id", "is_ood"]).to_pandas()
    truth = truth.set_index("source_id")
    assert len(sel) == s["rows"] and sel.index.is_unique and set(sel.index) <= set(truth.index)
    obs = sel[sel.split != "train"]
    ood = truth.loc[obs.index, "is_ood"].to_numpy()
    flagged = ~obs.train_like.to_numpy()
    n = s["rows"]
    rest = total - s["fit_seconds"]  # placement, reading, writing, accounting, figure: all scale with n
    proj = s["fit_seconds"] + rest * 1e6 / n
    print(f"selection benchmark: {n} stars ({s['observed']} observed), fit set {s['fit_set']} "
          f"({s['fit_training']} training), Spark {spark_cores()} cores")
    print(f"  fit (PCA + openTSNE on the driver)      : {s['fit_seconds']:7.1f} s")
    print(f"  transform (placement, Spark tasks)      : {s['place_seconds']:7.1f} s  "
          f"{s['placed'] / s['place_seconds']:8.0f} placed stars/s  {n / s['place_seconds']:8.0f} stars/s")
    print(f"    task time: {s['task_seconds']:.1f} s in {s['groups']} groups, of which map loading "
          f"{s['map_load_seconds']:.1f} s, openTSNE transform {s['transform_seconds']:.1f} s")
    print(f"  whole selection                         : {total:7.1f} s  {n / total:8.0f} stars/s")
    print(f"  projected to 10^6 stars                 : {proj / 60:7.1f} min (target < 10)")
    print(f"  OOD observed flagged train-unlike       : {flagged[ood].mean():7.3f} of {ood.sum()} (target >= 0.90)")
    print(f"  in-distribution observed flagged        : {flagged[~ood].mean():7.3f} of {(~ood).sum()} "
          f"(target <= 0.05)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def spark_cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
