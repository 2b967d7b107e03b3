"""Accuracy of the CNN ensemble against honest peers, on the same stars, in one run.

    .venv/bin/python benchmarks/accuracy.py [--stars 60000] [--work DIR] [--members 5] [--epochs 25]
    .venv/bin/python benchmarks/accuracy.py --work DIR   # DIR: a finished `stellar pipeline` run
                                                          # (e.g. benchmarks/trust.py --hard --work DIR)
    .venv/bin/python benchmarks/accuracy.py --work DIR --refit   # its champion refitted after training
                                                                # (mean correction, trust, calibration)

Without a finished run in --work it runs `stellar pipeline` on a generated survey
(``--hard``: the hard variant of conf/realism/hard.yaml, as benchmarks/trust.py
--hard builds it; ``--training-fraction``: the share of stars with catalogue
labels); then it reads that run's champion. Then, on the same training split, it fits:

  * the CNN deep ensemble (hybrid: RVS spectrum + XP + photometry and parallax);
  * a spectrum-only CNN ensemble (the same preset with the XP and scalar branches
    off, ``--spectrum-members`` members): the like-for-like peer of The Cannon;
  * a quadratic-in-labels Cannon on the rebinned spectra (benchmarks/cannon.py);
  * on exactly the CNN's inputs (the normalised spectrum, XP coefficients and
    scalars, as the network reads them): ridge regression (alpha by
    generalised cross-validation), k-nearest neighbours (k=10, distance-weighted,
    on PCA(50)) and gradient-boosted trees (histogram GBT, early-stopped on 10 %);
    and the same trees on the photometry/parallax scalars alone ("GBT scalars").

It evaluates every method on all stars with labels from the generator's truth
that are neither training stars nor injected out-of-distribution ones (the
test split and the observed stars: what a user gets), and prints the RMSE per
label and S/N bin (15-25, 25-50, > 50, all) for each method, the hybrid CNN
over the best hybrid peer (goal <= 0.7 in every cell) and the spectrum-only
CNN over The Cannon. Peers are fitted on the catalogue labels, as the CNN is.

With ``--limit N`` (default 600; 0: skip) it also fits the generator's own forward model to a
stratified sample of N of those stars (benchmarks/limit.py: weighted least squares, nuisances free,
several starts) and prints that physical limit per cell, RVS alone and RVS + XP + photometry +
parallax, with the hybrid CNN over the all-inputs limit and the spectrum-only CNN over the RVS one
(below 1: the network uses what the limit's fit does not, the population's regularities).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cannon import QuadraticCannon  # noqa: E402
from limit import physical_limit  # noqa: E402
from trust import HARD_SETS, refit_champion, run_pipeline  # noqa: E402

from stellar.config import load_config  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.tables import load_stats  # noqa: E402
from stellar.ensemble import load_split  # noqa: E402

BINS = (("15-25", 15, 25), ("25-50", 25, 50), (">50", 50, np.inf), ("all", 0, np.inf))


def flat_inputs(split: dict) -> np.ndarray:
    """The CNN's inputs as one row per star: normalised spectrum (masked pixels at the continuum),
    XP coefficients and scalars as the network reads them (missing ones are 0, their mean)."""
    spec = np.where(split["spectrum_mask"].numpy(), 1.0, split["spectrum"].numpy())
    x = np.concatenate([spec, split["xp"].numpy(), split["scalars"].numpy()], axis=1).astype(np.float64)
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def ivar(split: dict) -> np.ndarray:
    e = split["spectrum_error"].numpy().astype(np.float64)
    return np.where(split["spectrum_mask"].numpy() | (e <= 0), 0.0, 1.0 / np.maximum(e, 1e-6) ** 2)


def concat(a: dict, b: dict) -> dict:
    import torch

    return {k: torch.cat([a[k], b[k]]) for k in a}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stars", type=int, default=60000, help="survey size when one is built")
    ap.add_argument("--hard", action="store_true", help="build the hard survey variant")
    ap.add_argument("--training-fraction", type=float, default=None,
                    help="share of stars with catalogue labels when a survey is built (default 0.6; hard 0.21)")
    ap.add_argument("--work", default=None, help="a finished pipeline run, or where to build one")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--spectrum-members", type=int, default=3,
                    help="members of the spectrum-only CNN peer (0: skip it)")
    ap.add_argument("--epochs", type=int, default=None, help="max epochs (default: the preset's)")
    ap.add_argument("--refit", action="store_true",
                    help="refit the champion's post-training steps (mean correction, trust, calibration) with the "
                         "current code first, as benchmarks/trust.py --refit does")
    ap.add_argument("--limit", type=int, default=600, metavar="N",
                    help="stars of the physical-limit fit (benchmarks/limit.py; 0: skip it)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-acc-"))
    inst = load_instrument("gaia_rvs")
    if not (work / "pipeline-summary.json").is_file():  # `stellar pipeline` (restartable) makes the champion
        frac = args.training_fraction or (0.21 if args.hard else 0.6)
        run_pipeline(work, args.stars, [*(HARD_SETS if args.hard else []), f"synth.training_fraction={frac}",
                                        "synth.stars_per_file=5000", f"train.members={args.members}",
                                        *([f"train.model_overrides={{max_epochs: {args.epochs}}}"]
                                          if args.epochs else [])])
    sets = [f"work_dir={work}"]
    cfg = load_config(ROOT / "conf" / "local.yaml", sets)

    from stellar.registry import load_registered
    from stellar.train import train_ensemble

    ens, ident = load_registered(cfg, "champion")
    if args.refit:
        refit_champion(cfg, ens)
    root = cfg.preprocess.output_dir
    stats = load_stats(root)
    labels = ens.labels
    train = load_split(root, "train", labels, stats)
    evals = concat(load_split(root, "test", labels, stats), load_split(root, "observed", labels, stats))
    truth_t = pq.read_table(work / "synth" / "truth").to_pandas().set_index("source_id")
    sid = evals["source_id"].numpy()
    keep = ~truth_t.loc[sid, "is_ood"].to_numpy(bool)
    evals = {k: v[keep] for k, v in evals.items()}
    truth = truth_t.loc[evals["source_id"].numpy(), labels].to_numpy(float)
    snr = evals["snr"].numpy()
    y_train, _ = ens.physical_labels(train)
    good = np.all(np.isfinite(y_train), axis=1)
    preds, seconds = {}, {}

    t = time.perf_counter()
    preds["CNN hybrid"] = ens.predict(evals)["mean"]
    seconds["CNN hybrid"] = time.perf_counter() - t

    # the spectrum-only CNN: same preset and seeds, XP and scalar branches off, never registered
    # (--spectrum-members 0: skipped, for a quick look at the hybrid against its peers)
    if args.spectrum_members > 0:
        t = time.perf_counter()
        overrides = dict(cfg.train.model_overrides, use_xp=False, use_scalars=False,
                         **({"max_epochs": args.epochs} if args.epochs else {}))
        scfg = load_config(ROOT / "conf" / "local.yaml", sets + [
            f"train.members={args.spectrum_members}", f"train.model_overrides={json.dumps(overrides)}",
            "train.register_model=false",
            f"mlflow.tracking_uri=sqlite:///{work}/mlflow-spectrum-only.db",
            f"mlflow.artifact_root={work}/mlartifacts-spectrum-only"])
        spec_ens = train_ensemble(scfg, inst, log_mlflow=False)["ensemble"]
        preds["CNN spectrum"] = spec_ens.predict(evals)["mean"]
        seconds["CNN spectrum"] = time.perf_counter() - t

    t = time.perf_counter()
    cannon = QuadraticCannon().fit(train["spectrum"].numpy()[good].astype(np.float64), ivar(train)[good],
                                   y_train[good])
    cannon.fit_starts(y_train[good], n_starts=8)
    preds["Cannon"] = cannon.predict(evals["spectrum"].numpy().astype(np.float64), ivar(evals))
    seconds["Cannon"] = time.perf_counter() - t

    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    x_tr, x_ev = flat_inputs(train)[good], flat_inputs(evals)
    scaler = StandardScaler().fit(x_tr)
    z_tr, z_ev = scaler.transform(x_tr), scaler.transform(x_ev)
    t = time.perf_counter()
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(z_tr, y_train[good])
    preds["ridge"] = ridge.predict(z_ev)
    seconds["ridge"] = time.perf_counter() - t
    t = time.perf_counter()
    pca = PCA(50, random_state=0).fit(z_tr)
    knn = KNeighborsRegressor(10, weights="distance").fit(pca.transform(z_tr), y_train[good])
    preds["kNN"] = knn.predict(pca.transform(z_ev))
    seconds["kNN"] = time.perf_counter() - t
    t = time.perf_counter()
    preds["GBT"] = np.stack([HistGradientBoostingRegressor(max_iter=500, learning_rate=0.1, early_stopping=True,
                                                           validation_fraction=0.1, random_state=0)
                             .fit(x_tr, y_train[good][:, j]).predict(x_ev) for j in range(len(labels))], axis=1)
    seconds["GBT"] = time.perf_counter() - t
    # the same trees on the six photometry/parallax scalars alone: how much of a label they hold by themselves
    t = time.perf_counter()
    preds["GBT scalars"] = np.stack([HistGradientBoostingRegressor(max_iter=500, learning_rate=0.1, early_stopping=True,
                                                                   validation_fraction=0.1, random_state=0)
                                     .fit(train["scalars"].numpy()[good], y_train[good][:, j])
                                     .predict(evals["scalars"].numpy()) for j in range(len(labels))], axis=1)
    seconds["GBT scalars"] = time.perf_counter() - t

    limit = None
    if args.limit > 0:
        t = time.perf_counter()
        limit = physical_limit(work, n_stars=args.limit, seed=0, log=lambda line: None)
        seconds["limit"] = time.perf_counter() - t

    hybrid_peers, methods = ("ridge", "kNN", "GBT", "GBT scalars"), list(preds)
    print(f"accuracy benchmark ({ident['name']} v{ident['version']}, {work}): {int(good.sum())} training stars, "
          f"{len(truth)} evaluated (test split + observed, in distribution, truth labels); fit+predict seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    head = "".join(f"{m:>13}" for m in methods)
    lim_head = f" | {'limit RVS':>10}{'limit all':>10}{'hyb/lim':>8}{'spec/lim':>9}" if limit else ""
    print(f"{'label':<8}{'S/N':>7}{'n':>7} |{head} | {'hyb/peer':>9}{'spec/Cannon':>12}{lim_head}")
    worst = {"hybrid": 0.0, "spectrum": float("nan") if "CNN spectrum" not in preds else 0.0}
    for j, lab in enumerate(labels):
        for name, lo, hi in BINS:
            sel = np.isfinite(truth[:, j]) & (snr >= lo) & (snr < hi)
            if sel.sum() < 10:
                continue
            rmse = {m: float(np.sqrt(np.mean((p[sel, j] - truth[sel, j]) ** 2))) for m, p in preds.items()}
            best = min(rmse[m] for m in hybrid_peers)
            r_h = rmse["CNN hybrid"] / best
            r_s = rmse["CNN spectrum"] / rmse["Cannon"] if "CNN spectrum" in rmse else float("nan")
            worst["hybrid"], worst["spectrum"] = max(worst["hybrid"], r_h), max(worst["spectrum"], r_s)
            cell = (lambda x: f"{x:13.1f}") if lab == "teff" else (lambda x: f"{x:13.4f}")
            lim = ""
            if limit:
                l_r, l_a = limit["rvs"].get(f"{lab}|{name}", np.nan), limit["all_inputs"].get(f"{lab}|{name}", np.nan)
                lim_cell = (lambda x: f"{x:10.1f}") if lab == "teff" else (lambda x: f"{x:10.4f}")
                lim = (f" | {lim_cell(l_r)}{lim_cell(l_a)}{rmse['CNN hybrid'] / l_a:8.2f}"
                       f"{rmse.get('CNN spectrum', np.nan) / l_r:9.2f}")
            print(f"{lab:<8}{name:>7}{int(sel.sum()):>7} |" + "".join(cell(rmse[m]) for m in methods)
                  + f" | {r_h:9.2f}{r_s:12.2f}" + lim)
    print(f"worst hybrid CNN / best hybrid peer: {worst['hybrid']:.2f} (goal <= 0.7); "
          f"worst spectrum-only CNN / Cannon: {worst['spectrum']:.2f}")
    if limit:
        print(f"physical limit: the generator's model fitted to {limit['meta']['stars']} of these stars "
              f"(strata {limit['meta']['strata']}; benchmarks/limit.py)")


if __name__ == "__main__":
    main()
