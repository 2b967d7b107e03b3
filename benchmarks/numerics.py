"""What the BLAS-free, fixed-order products of the generator cost (stellar.numerics).

    .venv/bin/python benchmarks/numerics.py [--stars 2500] [--rounds 5]

In one process, rounds interleaved (this machine's speed drifts): the XP
model's coefficients and correlated noise for --stars stars with
``ordered_matmul`` against the same with BLAS ``@`` (the baseline), and one
whole generated file for scale. Prints medians and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import stellar.synth.xp as xp_module  # noqa: E402
from stellar.config import load_config  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.numerics import ordered_matmul  # noqa: E402
from stellar.synth.survey import FileTask, generate_file  # noqa: E402


def xp_once(model: xp_module.XpModel, n: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    teff, m_h, a_v = rng.uniform(4000, 7000, n), rng.uniform(-2, 0.4, n), rng.uniform(0, 2, n)
    flux = {"bp": rng.uniform(1e3, 1e5, n), "rp": rng.uniform(1e3, 1e5, n)}
    t = time.perf_counter()
    model.observe(rng, model.coefficients(teff, m_h, a_v, flux))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stars", type=int, default=2500)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = xp_module.XpModel()
    blas = lambda a, b: np.asarray(a) @ np.asarray(b)  # noqa: E731
    times = {"ordered": [], "blas": [], "file": []}
    inst = load_instrument("gaia_rvs")
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={d}"]).synth
        for r in range(args.rounds):
            for kind in ("ordered", "blas"):
                xp_module.ordered_matmul = ordered_matmul if kind == "ordered" else blas
                times[kind].append(xp_once(model, args.stars, r))
            xp_module.ordered_matmul = ordered_matmul
            t = time.perf_counter()
            generate_file(FileTask(r, 0, 99, args.stars, cfg.seed), cfg, inst, d)
            times["file"].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"XP coefficients + noise for {args.stars} stars, median of {args.rounds} interleaved rounds:")
    print(f"  BLAS @ (baseline)   {med['blas'] * 1e3:8.1f} ms")
    print(f"  ordered_matmul      {med['ordered'] * 1e3:8.1f} ms  ({med['ordered'] / med['blas']:.1f}x the baseline)")
    print(f"  one whole file      {med['file'] * 1e3:8.1f} ms  (the ordered products are "
          f"{(med['ordered'] - med['blas']) / med['file']:.1%} of it beyond BLAS)")


if __name__ == "__main__":
    main()
