"""Spread of the map-based out-of-distribution flags over seeds, in the selection test's set-up.

A 2-D map of a small survey moves with the seed and with the last bits of its
input, so a test floor on its flag rates must sit well below the worst seed,
not at one machine's value. This prints, per (synth seed, select seed) pair,
the share of injected out-of-distribution observed stars flagged train-unlike
(per kind too) and the share of in-distribution observed stars flagged, on the
5000-star survey of ``tests/test_selection.py``.

    .venv/bin/python benchmarks/selection_seeds.py 42:0 1:0 2:0 42:1 42:2 3:3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import small_config  # noqa: E402

from stellar.config import load_config  # noqa: E402
from stellar.ingest.run import ingest  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.preprocess import preprocess  # noqa: E402
from stellar.selection import select  # noqa: E402
from stellar.synth.survey import run_survey  # noqa: E402
from stellar.tables import read_table  # noqa: E402


def one(synth_seed: int, select_seed: int, inst) -> str:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = small_config(tmp, n_stars=5000, stars_per_file=2500,
                           **{"synth.ood_fraction": 0.04, "synth.seed": synth_seed})
        run_survey(cfg.synth, inst)
        cfg = load_config(ROOT / "conf" / "local.yaml", [
            f"work_dir={tmp}", "select.place_batch=1000", f"select.seed={select_seed}", "select.observed_sample=1500",
            "select.observed_per_training=10", "select.threshold=0.3"])
        ingest(cfg.ingest, inst, cfg.conf_dir)
        preprocess(cfg.preprocess, inst, cfg.ingest.output_dir)
        select(cfg.select, cfg.preprocess.output_dir)
        sel = read_table(cfg.select.output_dir, "selection").to_pandas().set_index("source_id")
        truth = pq.read_table(tmp / "synth" / "truth", columns=["source_id", "is_ood", "ood_kind"]).to_pandas()
        obs = sel[sel.split != "train"]
        t = truth.set_index("source_id").loc[obs.index]
        flagged = ~obs.train_like.to_numpy()
        ood = t.is_ood.to_numpy()
        per = {k: round(float(flagged[(t.ood_kind == k).to_numpy()].mean()), 3) for k in sorted(set(t.ood_kind[ood]))}
        return (f"synth {synth_seed} select {select_seed}: ood flagged {flagged[ood].mean():.3f} of {ood.sum()}, "
                f"in-distribution flagged {flagged[~ood].mean():.4f}, ratio "
                f"{flagged[ood].mean() / max(flagged[~ood].mean(), 1e-9):.1f}; per kind {per}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="SYNTH_SEED:SELECT_SEED pairs")
    args = ap.parse_args()
    inst = load_instrument("gaia_rvs")
    for pair in args.pairs:
        a, b = (int(x) for x in pair.split(":"))
        print(one(a, b, inst), flush=True)


if __name__ == "__main__":
    main()
