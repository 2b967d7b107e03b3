"""Speed of the preprocess job and of the training-data loader.

    .venv/bin/python benchmarks/preprocess.py [--stars 50000] [--work DIR]

Builds a survey (synth -> ingest with Spark, reused when --work already has it),
then measures in the same run:
  * the preprocess job (Spark local[*]): stars/s;
  * the loader (FeatureDataset: shuffle buffer 8192, batches of 256 tensors) over the
    whole features table vs a plain pyarrow read of the same columns
    (dataset.to_table), best of 3 each. Target: loader >= 0.8x the plain read.
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

import pyarrow.dataset as ds  # noqa: E402

from stellar.config import load_config  # noqa: E402
from stellar.runtime import SparkExecutor  # noqa: E402
from stellar.ingest.run import ingest  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.loader import FeatureDataset  # noqa: E402
from stellar.preprocess import preprocess  # noqa: E402
from stellar.spark import build_session  # noqa: E402
from stellar.synth.survey import run_survey  # noqa: E402


def best_of(n, fn):
    best = float("inf")
    out = None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=50000)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-pre-"))
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", f"synth.n_stars={args.stars}",
                                                     "synth.stars_per_file=5000"])
    inst = load_instrument(cfg.instrument, cfg.conf_dir)
    spark = build_session(cfg, "bench-preprocess")
    if not (work / "synth" / "survey.json").exists():
        print(f"building a {args.stars}-star survey and its tables ...", flush=True)
        run_survey(cfg.synth, inst, executor=SparkExecutor(spark, "stellar synth"))
    ingest(cfg.ingest, inst, cfg.conf_dir, mapper=SparkExecutor(spark))
    shutil.rmtree(cfg.preprocess.output_dir, ignore_errors=True)
    mapper = SparkExecutor(spark, "bench preprocess")
    spark.sparkContext.parallelize(range(4), 4).map(lambda x: x).collect()  # warm Python workers
    t_job, summary = best_of(1, lambda: preprocess(cfg.preprocess, inst, cfg.ingest.output_dir, mapper=mapper))
    spark.stop()
    n = summary["counts"]["stars"]

    loader = FeatureDataset(cfg.preprocess.output_dir, split=None, batch_size=256, shuffle_buffer=8192)
    cols = loader._columns()

    def plain():
        return ds.dataset(loader.path, format="parquet", partitioning="hive").to_table(columns=cols).num_rows

    def run_loader():
        return sum(len(b["source_id"]) for b in loader)

    t_plain, rows_plain = best_of(3, plain)
    t_loader, rows_loader = best_of(3, run_loader)
    assert rows_plain == rows_loader == n
    print(f"preprocess benchmark: {n} stars, {summary['partitions']} partitions")
    print(f"  preprocess job, Spark local[*]       : {t_job:7.2f} s  {n / t_job:8.0f} stars/s")
    print(f"  plain pyarrow read (to_table)        : {t_plain:7.2f} s  {n / t_plain:8.0f} spectra/s")
    print(f"  loader (shuffled tensor batches)     : {t_loader:7.2f} s  {n / t_loader:8.0f} spectra/s")
    print(f"  loader / plain read                  : {t_plain / t_loader:6.2f}x (target >= 0.8)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
