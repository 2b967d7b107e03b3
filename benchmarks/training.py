"""Training speed on CPU: the conv stack channels-last (the default) against the (B, C, L) modules.

    .venv/bin/python benchmarks/training.py [--stars 50000] [--work DIR] [--epochs 3] [--rounds 2] [--threads 1]

Builds (or reuses, with --work) a generated survey through preprocess, then
trains one hybrid member for --epochs epochs (early stopping off) with each
layout of the conv stack, in interleaved rounds, on --threads torch threads
(1 = what each ensemble member gets under Spark with train.threads_per_member 1).
Prints seconds per epoch (training pass plus the validation forward) for each,
their ratio, and how far apart the two runs' losses are: same weights, same
batches, same dropout masks, so only float rounding separates them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from inference import build  # noqa: E402
from stellar.config import load_config  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.model import HybridNet, load_model_preset  # noqa: E402
from stellar.tables import load_stats  # noqa: E402
from stellar.tables import read_table  # noqa: E402
from stellar.ensemble import train_member  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=50_000)
    ap.add_argument("--work", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved measurement rounds (best of each)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-train-"))
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", f"synth.n_stars={args.stars}",
                                                     "synth.stars_per_file=10000"])
    inst = load_instrument(cfg.instrument, cfg.conf_dir)
    if not (work / "features" / "_CURRENT").exists():
        build(args, cfg, inst)
    stats = load_stats(cfg.preprocess.output_dir)
    labels = list(inst.labels)
    mcfg = load_model_preset("hybrid", str(ROOT / "conf")).model_copy(
        update={"max_epochs": args.epochs, "patience": args.epochs + 1})
    n_train = int(np.sum(read_table(cfg.preprocess.output_dir, "features", ["split"])["split"]
                         .to_numpy(zero_copy_only=False) == "train"))

    best: dict[bool, float] = {}
    losses: dict[bool, list[float]] = {}
    for _ in range(args.rounds):
        for layout in (False, True):
            HybridNet.cpu_channels_last = layout
            m = train_member(cfg.preprocess.output_dir, mcfg, labels, stats, 0, 0, args.threads, "cpu")
            best[layout] = min(best.get(layout, float("inf")), m.seconds / len(m.history))
            losses[layout] = [h["val_loss"] for h in m.history]
    HybridNet.cpu_channels_last = True
    print(f"training benchmark: one hybrid member, {n_train} training stars, batch {mcfg.batch_size}, "
          f"{args.threads} torch thread(s), {args.epochs} epochs; best of {args.rounds} interleaved rounds")
    print(f"  conv stack as (B, C, L) modules (baseline): {best[False]:7.2f} s/epoch")
    print(f"  conv stack channels-last (default)        : {best[True]:7.2f} s/epoch  "
          f"{best[False] / best[True]:.2f}x faster")
    diff = max(abs(a - b) for a, b in zip(losses[False], losses[True]))
    print(f"  validation loss per epoch, largest difference between the layouts: {diff:.2e} "
          f"(losses {', '.join(f'{v:.4f}' for v in losses[True])})")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
