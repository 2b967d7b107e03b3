"""Per-core throughput of each stage, measured, projected to a Gaia DR4 rerun and a 4MOST night.

    .venv/bin/python benchmarks/scale.py [--sizes 10000 40000] [--work DIR] [--cores-cluster 512]

Runs the whole pipeline (Spark local[*], the embedded default config) at two
survey sizes in the same run, and fits each stage's wall time as
``fixed + per_star * N``. Training scales with the number of labelled
training stars instead of N, and the t-SNE map fit is fixed by its capped fit
set; both are part of the fitted lines. From the per-star slopes and the cores
used, it prints stars/s per core for each stage, then projects core-hours and
wall time for:

* Gaia DR4: ~10^7 to 10^8 stars with RVS spectra, the ones the hybrid model
  reads. The ~10^8 XP-only sources cost at most the same ingest rate, so the
  projection is an upper bound for them.
* A 4MOST night: about 2,400 fibres over ~12 pointings, ~30,000 spectra.

The projection assumes that each stage's per-star work scales linearly over
cores, which holds for its tasks: files, partitions and feature parts are
independent. It does not cover shared-filesystem bandwidth, so it is measured
compute, not a promise about your cluster's I/O.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline import run  # noqa: E402

SCALE_STAGES = ["ingest", "preprocess", "select", "predict"]  # work per catalogue star
QUICK_TRAIN = ["train.model_overrides={max_epochs: 3, patience: 3}"]
TARGETS = {"Gaia DR4, 1e7 RVS stars": 1e7, "Gaia DR4, 1e8 RVS stars": 1e8, "4MOST night, 3e4 spectra": 3e4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[10000, 40000])
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--cores-cluster", type=int, default=512, help="cluster size for the wall-time projection")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"config overrides (default: {' '.join(QUICK_TRAIN)}: training is per model, not per "
                         "catalogue star, and is not projected)")
    args = ap.parse_args()
    args.overrides = args.overrides or QUICK_TRAIN
    base = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-scale-"))
    cores = os.cpu_count() or 1
    runs = {}
    for n in args.sizes:
        summary, wall = run(base / f"n{n}", n, args.overrides)
        runs[n] = {k: v["seconds"] for k, v in summary["stages"].items()}
        print(f"  measured {n:>7} stars: " + ", ".join(f"{k} {v:.1f} s" for k, v in runs[n].items()), flush=True)
    (n1, n2) = args.sizes
    print(f"\nscale benchmark: stages at {n1} and {n2} stars on {cores} cores (Spark local[*]), "
          f"time = fixed + per_star * N")
    print(f"  {'stage':<11} {'fixed s':>8} {'ms/star':>8} {'stars/s/core':>13}")
    per_star = {}
    for stage in runs[n1]:
        t1, t2 = runs[n1][stage], runs[n2].get(stage, 0.0)
        slope = max((t2 - t1) / (n2 - n1), 0.0)
        fixed = max(t1 - slope * n1, 0.0)
        per_star[stage] = slope
        rate = 1.0 / (slope * cores) if slope > 0 else float("inf")
        print(f"  {stage:<11} {fixed:8.1f} {1e3 * slope:8.3f} {rate:13.0f}")
    core_s = sum(per_star[s] for s in SCALE_STAGES if s in per_star) * cores  # core-seconds per star
    print(f"\n  catalogue stages ({', '.join(SCALE_STAGES)}): {core_s * 1e3:.2f} core-ms per star, "
          f"{1 / core_s:.0f} stars/s per core")
    fixed = sum(max(runs[n1][s] - per_star[s] * n1, 0.0) for s in SCALE_STAGES if s in per_star)
    print(f"  {'target':<28} {'core-hours':>11} {'wall on ' + str(args.cores_cluster) + ' cores':>18} "
          f"{'wall on 16 cores':>17}   (+ {fixed:.0f} s of fixed per-stage cost)")
    for name, n in TARGETS.items():
        ch = core_s * n / 3600
        print(f"  {name:<28} {ch:11.3g} {60 * ch / args.cores_cluster:14.1f} min {60 * ch / 16:13.1f} min")
    print("  (select's slope includes its map fit, which grows with the fit set until that is capped at "
          "select.train_sample + select.observed_sample stars: an upper bound beyond that)")
    print("  (training is per model, not per catalogue star, and ran here with a few epochs only; "
          "benchmarks/pipeline.py times it at full length)")
    if not args.work:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
