"""Speed of the synthetic-survey generator.

    .venv/bin/python benchmarks/synth.py [--stars 100000] [--stars-per-file 5000]

Prints, measured in the same run:
  * baseline: one file generated in this process (stars/s on one core), and
    the spectrum model alone (noiseless spectra, stars/s on one core);
  * the Spark job (local[*]) on --stars stars: stars/s, MB/s written, and its
    parallel efficiency against cores x the one-core baseline;
  * a projection to 10^6 stars on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stellar.config import load_config  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.synth.population import draw_population  # noqa: E402
from stellar.synth.spectra import SpectrumModel  # noqa: E402
from stellar.synth.survey import generate_file, plan_survey, run_survey  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=100_000)
    ap.add_argument("--stars-per-file", type=int, default=5000)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed afterwards)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-synth-"))
    cores = os.cpu_count() or 1
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", f"synth.n_stars={args.stars}",
                                                     f"synth.stars_per_file={args.stars_per_file}"])
    inst = load_instrument(cfg.instrument, cfg.conf_dir)

    # Baseline 1: the spectrum model alone, one core.
    rng = np.random.default_rng(0)
    pop = draw_population(rng, 4096, 0.0, 14.1, 15.0, rng.uniform(-60, 60, 4096))
    model = SpectrumModel(inst)
    p = {k: pop[k] for k in ("teff", "logg", "m_h", "alpha_m", "fe_h", "a_li", "vbroad", "a_v")}
    model.spectra({k: v[:512] for k, v in p.items()})  # warm up
    t = time.perf_counter()
    for lo in range(0, 4096, 512):
        model.spectra({k: v[lo:lo + 512] for k, v in p.items()})
    spec_rate = 4096 / (time.perf_counter() - t)

    # Baseline 2: one whole file (all products, gzip ECSV) in this process.
    one = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", "synth.n_stars=4000",
                                                     "synth.stars_per_file=4000"]).synth
    task = plan_survey(one)[0]
    t = time.perf_counter()
    res = generate_file(task, one, inst, str(work / "baseline"))
    base_s = time.perf_counter() - t
    base_rate = res["n_stars"] / base_s
    base_mb = sum(res["bytes"].values()) / 1e6

    # The Spark job.
    from stellar.spark import build_session
    from stellar.runtime import SparkExecutor

    spark = build_session(cfg, "bench-synth")
    t = time.perf_counter()
    m = run_survey(cfg.synth, inst, executor=SparkExecutor(spark, "stellar synth"))
    job_s = time.perf_counter() - t
    spark.stop()
    mb = sum(sum(f["bytes"].values()) for f in m["files"]) / 1e6
    rate = m["n_stars"] / job_s

    print(f"synthetic survey benchmark ({inst.name}, {cores} cores)")
    print(f"  baseline, spectrum model only, 1 core : {spec_rate:9.0f} stars/s")
    print(f"  baseline, one file in-process, 1 core : {base_rate:9.0f} stars/s  ({res['n_stars']} stars, "
          f"{base_mb / base_s:.1f} MB/s gzip ECSV)")
    print(f"  Spark job local[*], {m['n_stars']} stars, {m['n_files']} files: {job_s:7.1f} s = {rate:.0f} stars/s, "
          f"{mb:.0f} MB written ({mb / job_s:.1f} MB/s)")
    print(f"  parallel efficiency vs {cores} x one-core baseline: {rate / (cores * base_rate):.2f}")
    print(f"  projection: 10^6 stars on this machine ~ {1e6 / rate / 60:.1f} min, ~{mb / m['n_stars'] * 1e6 / 1e3:.0f} GB")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
