"""Speed of the ingest stage on a generated bulk RVS file.

    .venv/bin/python benchmarks/ingest.py [--stars 20000] [--work DIR]

Generates one RvsMeanSpectrum_*.csv.gz of --stars spectra (gzip ECSV, as the
Gaia archive writes them), then measures in the same run:
  * `gzip -dc FILE > /dev/null` (decompression alone, one process);
  * astropy `Table.read(FILE, format="ascii.ecsv")` (one process);
  * stellar's parser on the same file in one process (parse + checks, no write), on one
    thread and on every CPU of the process (array columns converted in parallel);
  * the ingest job (Spark local[*], parse + checks + Parquet write + accounting).
Targets: parser >= 5x astropy per process; job time <= 2x decompression time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stellar.config import load_config  # noqa: E402
from stellar.ingest.products import normalise, rvs_product  # noqa: E402
from stellar.ingest.readers import InputFile, read_ecsv  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.io.gaia_ecsv import uncompressed_size_hint  # noqa: E402
from stellar.synth.survey import RVS_DIR, run_survey  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=20000)
    ap.add_argument("--work", default=None)
    ap.add_argument("--skip-astropy", action="store_true", help="skip the (slow) astropy baseline")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-ingest-"))
    inst = load_instrument("gaia_rvs")
    cfg = load_config(ROOT / "conf" / "local.yaml", [
        f"work_dir={work}", f"synth.n_stars={args.stars}", f"synth.stars_per_file={args.stars}",
        f"synth.output_dir={work / 'synth'}"])
    rvs_file = next((work / "synth" / RVS_DIR).glob("RvsMeanSpectrum_*.csv.gz"), None)
    if rvs_file is None:
        print(f"generating {args.stars} stars ...", flush=True)
        run_survey(cfg.synth, inst)
        rvs_file = next((work / "synth" / RVS_DIR).glob("RvsMeanSpectrum_*.csv.gz"))
    gz_mb = rvs_file.stat().st_size / 1e6
    raw_mb = uncompressed_size_hint(rvs_file) / 1e6
    n = args.stars

    t_gzip, _ = timed(lambda: subprocess.run(f"gzip -dc '{rvs_file}' > /dev/null", shell=True, check=True))

    product = rvs_product(inst.n_pixels)
    inp = InputFile(str(rvs_file), "bench", "rvs", "ecsv", rvs_file.stat().st_size, 0)

    def parse():
        res = read_ecsv(inp, product)
        rows = 0
        for b in res.batches:
            good, _ = normalise(product, b.columns, b.problems, b.lines, "bench")
            rows += good.num_rows
        return rows

    from stellar.ingest import readers

    auto_threads = readers.available_threads
    readers.available_threads = lambda: 1  # one thread, as in a Spark task with spark.task.cpus=1
    t_parse1, rows = timed(parse)
    assert rows == n, rows
    readers.available_threads = auto_threads  # every CPU of the process (array columns in parallel)
    t_parse, rows = timed(parse)
    assert rows == n, rows

    t_astropy = float("nan")
    if not args.skip_astropy:
        from astropy.table import Table

        t_astropy, t = timed(lambda: Table.read(rvs_file, format="ascii.ecsv", fill_values=[("null", "0")]))
        assert len(t) == n
        del t

    # The job: Spark local[*] on just this file (chunks of the file are parallel tasks).
    gaia_root = work / "bench_root"
    (gaia_root / RVS_DIR).mkdir(parents=True, exist_ok=True)
    link = gaia_root / RVS_DIR / rvs_file.name
    if not link.exists():
        os.link(rvs_file, link)
    jcfg = load_config(ROOT / "conf" / "local.yaml", [
        f"work_dir={work}", f"ingest.gaia_root={gaia_root}", "ingest.labels=[]",
        f"ingest.output_dir={work / 'tables'}"])
    shutil.rmtree(work / "tables", ignore_errors=True)
    from stellar.runtime import SparkExecutor
    from stellar.ingest.run import ingest
    from stellar.spark import build_session

    spark = build_session(jcfg, "bench-ingest")
    spark.sparkContext.parallelize(range(4), 4).map(lambda x: x).collect()  # start the Python workers
    t_job, summary = timed(lambda: ingest(jcfg.ingest, inst, jcfg.conf_dir, mapper=SparkExecutor(spark)))
    spark.stop()
    assert summary["written"] == n

    cores = os.cpu_count() or 1
    print(f"ingest benchmark: {n} RVS spectra, {gz_mb:.0f} MB gzip / {raw_mb:.0f} MB ECSV text, {cores} cores")
    print(f"  gzip -dc > /dev/null (1 process)   : {t_gzip:7.2f} s  {n / t_gzip:8.0f} stars/s  {gz_mb / t_gzip:6.1f} MB/s gz")
    if not args.skip_astropy:
        print(f"  astropy Table.read ascii.ecsv (1p) : {t_astropy:7.2f} s  {n / t_astropy:8.0f} stars/s")
    print(f"  stellar parser, 1 process, 1 thread: {t_parse1:7.2f} s  {n / t_parse1:8.0f} stars/s  {gz_mb / t_parse1:6.1f} MB/s gz")
    print(f"  stellar parser, 1 process, {readers.available_threads()} CPUs  : {t_parse:7.2f} s  {n / t_parse:8.0f} stars/s  {gz_mb / t_parse:6.1f} MB/s gz")
    print(f"  ingest job, Spark local[*]         : {t_job:7.2f} s  {n / t_job:8.0f} stars/s  {gz_mb / t_job:6.1f} MB/s gz"
          f"  ({summary['tasks']} tasks)")
    if not args.skip_astropy:
        print(f"  parser vs astropy per process      : {t_astropy / t_parse:6.1f}x faster (target >= 5x); "
              f"single-threaded {t_astropy / t_parse1:.1f}x")
    print(f"  job time / decompression time      : {t_job / t_gzip:6.2f} (target <= 2)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
