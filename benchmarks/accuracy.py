"""Accuracy of the CNN ensemble against The Cannon and k-nearest neighbours, on the same stars.

    .venv/bin/python benchmarks/accuracy.py [--stars 60000] [--work DIR] [--members 5] [--epochs 25]

Builds a generated survey (about 60 % of in-distribution stars labelled, so
>= 20k training stars pass the label cuts), ingests and preprocesses it, then
on the same training / test split:
  * the CNN deep ensemble (hybrid preset; members trained as Spark tasks);
  * a quadratic-in-labels Cannon on the rebinned spectra (benchmarks/cannon.py);
  * k-nearest neighbours (k=10, distance-weighted) on PCA(50) of the standardised
    spectrum + XP + scalars.
Prints RMSE and bias per label overall and in S/N bins 15-25, 25-50, > 50, the
CNN/Cannon RMSE ratio (target <= 0.7 in every bin), the ensemble's z-score std
and 68 % coverage per label (target z std 0.9-1.1), and training time per member.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cannon import QuadraticCannon  # noqa: E402

from stellar.config import load_config  # noqa: E402
from stellar.ingest.distributed import spark_mapper  # noqa: E402
from stellar.ingest.run import ingest  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.preprocess import preprocess  # noqa: E402
from stellar.spark import build_session  # noqa: E402
from stellar.synth.distributed import spark_runner  # noqa: E402
from stellar.synth.survey import run_survey  # noqa: E402
from stellar.trainer import train_ensemble  # noqa: E402
from stellar.training import load_split  # noqa: E402

BINS = (("15-25", 15, 25), ("25-50", 25, 50), (">50", 50, np.inf), ("all", 0, np.inf))


def arrays(split: dict, ens) -> dict:
    truth, err = ens.physical_labels(split)
    return {"spectrum": split["spectrum"].numpy(), "mask": split["spectrum_mask"].numpy(),
            "xp": split["xp"].numpy(), "scalars": split["scalars"].numpy(), "labels": truth,
            "err": split["spectrum"].new_zeros(1).numpy(), "snr": split["snr"].numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=60000)
    ap.add_argument("--work", default=None)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=25)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-acc-"))
    cfg = load_config(ROOT / "conf" / "local.yaml", [
        f"work_dir={work}", f"synth.n_stars={args.stars}", "synth.stars_per_file=5000",
        "synth.training_fraction=0.6", f"train.members={args.members}",
        f"train.model_overrides={{max_epochs: {args.epochs}, patience: 5}}", "train.register_model=false",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", f"mlflow.artifact_root={work}/mlartifacts"])
    inst = load_instrument("gaia_rvs")
    spark = build_session(cfg, "bench-accuracy")
    if not (work / "synth" / "survey.json").exists():
        run_survey(cfg.synth, inst, runner=spark_runner(spark))
    ingest(cfg.ingest, inst, cfg.conf_dir, mapper=spark_mapper(spark))
    pre = preprocess(cfg.preprocess, inst, cfg.ingest.output_dir, mapper=spark_mapper(spark))
    n_train = pre["counts"]["split:train"]
    t = time.perf_counter()
    res = train_ensemble(cfg, inst, mapper=spark_mapper(spark, "bench train"), log_mlflow=False)
    t_cnn = time.perf_counter() - t
    spark.stop()
    ens = res["ensemble"]
    root = cfg.preprocess.output_dir
    train = load_split(root, "train", ens.labels, ens.stats)
    test = load_split(root, "test", ens.labels, ens.stats)
    tr, te = arrays(train, ens), arrays(test, ens)
    cnn = ens.predict(test)["mean"]

    # The Cannon: spectra only, inverse variances from the features' errors (masked pixels: 0).
    def ivar(split):
        e = split["spectrum_error"].numpy().astype(np.float64)
        return np.where(split["spectrum_mask"].numpy() | (e <= 0), 0.0, 1.0 / np.maximum(e, 1e-6) ** 2)

    good = np.all(np.isfinite(tr["labels"]), axis=1)
    t = time.perf_counter()
    cannon = QuadraticCannon().fit(tr["spectrum"][good].astype(np.float64), ivar(train)[good], tr["labels"][good])
    cannon.fit_starts(tr["labels"][good], n_starts=8)
    t_cannon_fit = time.perf_counter() - t
    cannon_pred = cannon.predict(te["spectrum"].astype(np.float64), ivar(test))

    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    def knn_x(a):
        return np.concatenate([a["spectrum"], a["xp"], a["scalars"]], axis=1)

    scaler = StandardScaler().fit(knn_x(tr)[good])
    pca = PCA(50, random_state=0).fit(scaler.transform(knn_x(tr)[good]))
    knn = KNeighborsRegressor(10, weights="distance").fit(pca.transform(scaler.transform(knn_x(tr)[good])),
                                                          tr["labels"][good])
    knn_pred = knn.predict(pca.transform(scaler.transform(knn_x(te))))

    truth, snr = te["labels"], te["snr"]
    print(f"accuracy benchmark: {n_train} training stars, {len(truth)} test stars; "
          f"CNN {res['kept']}/{res['members']} members, {t_cnn:.0f} s wall on Spark local[*], "
          f"per member {', '.join(f'{s:.0f}' for s in res['member_seconds'])} s "
          f"(best epochs {res['member_best_epochs']}); Cannon fit {t_cannon_fit:.0f} s")
    print(f"{'label':<8}{'S/N':>7}{'n':>6} | {'RMSE CNN':>10}{'Cannon':>10}{'kNN':>10}{'CNN/Cannon':>11} |"
          f" {'bias CNN':>9}{'Cannon':>9}{'kNN':>9}")
    worst = 0.0
    for j, lab in enumerate(ens.labels):
        for name, lo, hi in BINS:
            sel = np.isfinite(truth[:, j]) & (snr >= lo) & (snr < hi)
            if sel.sum() < 5:
                continue
            r = {k: p[sel, j] - truth[sel, j] for k, p in (("cnn", cnn), ("cannon", cannon_pred), ("knn", knn_pred))}
            rmse = {k: float(np.sqrt(np.mean(v**2))) for k, v in r.items()}
            ratio = rmse["cnn"] / rmse["cannon"]
            worst = max(worst, ratio)
            fmt = (lambda x: f"{x:10.1f}") if lab == "teff" else (lambda x: f"{x:10.4f}")
            bfmt = (lambda x: f"{x:9.1f}") if lab == "teff" else (lambda x: f"{x:9.4f}")
            print(f"{lab:<8}{name:>7}{int(sel.sum()):>6} | {fmt(rmse['cnn'])}{fmt(rmse['cannon'])}{fmt(rmse['knn'])}"
                  f"{ratio:11.2f} | {bfmt(np.mean(r['cnn']))}{bfmt(np.mean(r['cannon']))}{bfmt(np.mean(r['knn']))}")
    m = res["metrics"]
    print("calibration of the CNN ensemble on the test split (target z std 0.9-1.1):")
    for lab in ens.labels:
        print(f"  {lab:<8} z std {m[f'{lab}/all/z_std']:.3f} (uncalibrated {res['z_std_uncalibrated'][lab]:.3f}),"
              f" 68% coverage {m[f'{lab}/all/coverage68']:.3f}, calibration factor {res['calibration'][lab]:.3f}")
    print(f"worst CNN/Cannon RMSE ratio over labels and bins: {worst:.2f} (target <= 0.7)")


if __name__ == "__main__":
    main()
