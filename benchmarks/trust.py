"""Trust figures of a pipeline run against the generator's truth.

    .venv/bin/python benchmarks/trust.py [--stars 20000] [--work DIR] [--set KEY=VALUE ...]
    .venv/bin/python benchmarks/trust.py --hard [--stars 30000] [--work DIR]

``--hard`` generates the harder survey (``synth.realism: hard``, conf/realism/hard.yaml:
A0 up to ~3 mag along the disc with the DIB, correlated pixel noise, RV residuals, continuum
wiggles, fast rotators; 5 % out-of-distribution stars; ~6k labels of 30k stars). Nothing in the
model, its thresholds or the pipeline's settings changes with it.

Runs `stellar pipeline` on a generated survey (or reads a finished run in
--work) and prints, from the published predictions and the survey's truth
table:

* impossible labels published (outside stellar.trust.PHYSICAL_ENVELOPE);
* catastrophic errors (|dTeff| > 1000 K, |dlog g| > 1, |d[M/H]| > 0.5) among
  unflagged (ood false) in-distribution stars, and among all published stars;
* recall of ``ood`` per injected out-of-distribution kind, and the false-flag
  rate among in-distribution stars, with the share each ood_reason bit flags;
* the z-score spread (predicted - true) / err per label and S/N bin among
  unflagged in-distribution stars the model never fitted (the observed split:
  the training stars' residuals are what the members were fitted to, the
  validation and test stars' what early stopping and the calibration were, and
  none of them measures the calibration; the training stars' spread is printed
  beside it);
* the RMSE of stars without BP coefficients against the others, both among
  the stars the model never fitted.

Thresholds inside the model come from its validation split, the uncertainty
calibration from its validation and test splits; nothing here is fed back into them.

``--refit`` (with ``--work`` a finished run) re-assesses that run's champion with the
current code instead of reading its predictions: the trust thresholds and the uncertainty
calibration are fitted again on its held-out stars exactly as the trainer fits them
(``stellar.train.fit_trust_and_calibration`` and ``calibrate_on_held_out``; the trained members and their emulator
are kept), and every feature row is predicted again (one process). A change to the trust
tests or the calibration is then measured in seconds (~11 s on the demo run) instead of a retraining.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stellar.tables import read_table  # noqa: E402
from stellar.trust import OOD_BITS, PHYSICAL_ENVELOPE  # noqa: E402

SNR_BINS = ((15.0, 25.0), (25.0, 50.0), (50.0, np.inf))
# the splits whose stars the model was fitted on (members; early stopping, calibration)
FITTED_SPLITS = ("train", "validation", "test")  # the test stars join the published calibration
CATASTROPHIC = {"teff": 1000.0, "logg": 1.0, "m_h": 0.5}
# SB2 recall by the components' separation and the secondary's RVS light ratio (the RVS resolution
# element is ~26 km/s)
SB2_DV_BINS = (0.0, 26.0, 40.0, 60.0, 90.0, 500.0)
SB2_LIGHT_BINS = (0.0, 0.25, 0.4, 0.6, 1.01)
# the hard survey's settings (--hard; benchmarks/accuracy.py builds it alike)
HARD_SETS = ["synth.realism=hard", "synth.ood_fraction=0.05", "synth.training_fraction=0.21"]


def run_pipeline(work: Path, stars: int, sets: list[str]) -> None:
    cmd = [sys.executable, "-m", "stellar.cli", "pipeline", "--config", str(ROOT / "conf" / "local.yaml"),
           "--set", f"work_dir={work}", "--set", f"synth.n_stars={stars}"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"pipeline failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def figures(work: Path, pred=None) -> dict:
    """The figures of the run in ``work`` (``pred``: a predictions DataFrame to use instead of its table)."""
    pred = read_table(work / "predictions", "predictions").to_pandas() if pred is None else pred
    truth = pq.read_table(work / "synth" / "truth").to_pandas()
    labels = [k for k in PHYSICAL_ENVELOPE if k in pred.columns]
    m = pred.merge(truth, on="source_id", suffixes=("", "_true"))
    published = m[m.problem.isna()]
    out: dict = {"stars": len(pred), "published": len(published), "labels": labels}
    impossible = np.zeros(len(published), bool)
    for k in labels:
        lo, hi = PHYSICAL_ENVELOPE[k]
        v = published[k].to_numpy(dtype=float)
        impossible |= np.isfinite(v) & ((v < lo) | (v > hi))
    out["impossible_published"] = int(impossible.sum())
    ood = published.ood.fillna(True).to_numpy(bool)
    injected = published.is_ood.to_numpy(bool)
    cat = np.zeros(len(published), bool)
    for k, limit in CATASTROPHIC.items():
        d = np.abs(published[k].to_numpy(float) - published[f"{k}_true"].to_numpy(float))
        cat |= np.nan_to_num(d, nan=np.inf) > limit
    out["catastrophic_unflagged_in_distribution"] = int((cat & ~ood & ~injected).sum())
    out["catastrophic_unflagged_any"] = int((cat & ~ood).sum())
    out["catastrophic_all"] = int(cat.sum())
    kinds = sorted(set(published.ood_kind[injected].astype(str)))
    out["recall"] = {k: {"n": int((published.ood_kind == k).sum()),
                         "ood": float(ood[(published.ood_kind == k).to_numpy()].mean())} for k in kinds}
    out["false_flags"] = float(ood[~injected].mean()) if (~injected).any() else float("nan")
    reason = published.ood_reason.fillna(0).to_numpy(np.int64)
    out["false_flags_by_reason"] = {name: float(((reason[~injected] & bit) != 0).mean())
                                    for name, (bit, _) in OOD_BITS.items()}
    for k in kinds:
        sel = (published.ood_kind == k).to_numpy()
        out["recall"][k]["by_reason"] = {name: float(((reason[sel] & bit) != 0).mean())
                                         for name, (bit, _) in OOD_BITS.items()}
    sb2 = (published.ood_kind == "sb2_binary").to_numpy()
    if sb2.any():  # what a binary's detectability rests on: the separation and the secondary's light
        dv = np.abs(published.sb2_dv.to_numpy(float))
        lr = published.light_ratio.to_numpy(float)
        out["sb2_recall"] = {}
        for name, x, edges in (("|dv| km/s", dv, SB2_DV_BINS), ("light ratio", lr, SB2_LIGHT_BINS)):
            out["sb2_recall"][name] = {f"{lo:g}-{hi:g}": (int((s := sb2 & (x >= lo) & (x < hi)).sum()),
                                                          float(ood[s].mean()) if s.any() else float("nan"))
                                       for lo, hi in zip(edges[:-1], edges[1:])}
    unseen = ~published.split.isin(FITTED_SPLITS).to_numpy(bool)
    for key, sel in (("z_std", ~ood & ~injected & unseen), ("z_std_train", ~ood & ~injected &
                                                               (published.split == "train").to_numpy(bool))):
        good = published[sel]
        snr = good.snr.to_numpy(float)
        out[key] = {}
        for k in labels:
            z = (good[k].to_numpy(float) - good[f"{k}_true"].to_numpy(float)) / good[f"{k}_err"].to_numpy(float)
            row = {"all": float(np.nanstd(z))}
            for lo, hi in SNR_BINS:
                s = (snr >= lo) & (snr < hi)
                row[f"{lo:g}-{hi:g}"] = float(np.nanstd(z[s])) if s.sum() > 10 else float("nan")
            out[key][k] = row
    out["z_std_stars"] = int((~ood & ~injected & unseen).sum())
    ind = published[~injected & unseen]
    no_bp = ~ind.has_bp.to_numpy(bool)
    out["no_bp"] = {"n": int(no_bp.sum()), "rmse": {}, "rmse_others": {}}
    for k in labels:
        r = ind[k].to_numpy(float) - ind[f"{k}_true"].to_numpy(float)
        out["no_bp"]["rmse"][k] = float(np.sqrt(np.nanmean(r[no_bp] ** 2))) if no_bp.any() else float("nan")
        out["no_bp"]["rmse_others"][k] = float(np.sqrt(np.nanmean(r[~no_bp] ** 2)))
    return out


def report(f: dict) -> str:
    lines = [f"trust figures: {f['stars']} stars, {f['published']} with labels",
             f"  impossible labels published: {f['impossible_published']}",
             f"  catastrophic errors (|dTeff|>1000 K, |dlogg|>1, |d[M/H]|>0.5): unflagged in-distribution "
             f"{f['catastrophic_unflagged_in_distribution']}, unflagged any {f['catastrophic_unflagged_any']}, "
             f"all {f['catastrophic_all']}",
             f"  false flags (ood among in-distribution): {f['false_flags']:.3f}  by reason: " +
             ", ".join(f"{k} {v:.3f}" for k, v in f["false_flags_by_reason"].items() if v)]
    for k, r in f["recall"].items():
        lines.append(f"  ood recall {k:<22} {r['ood']:.3f} of {r['n']}  by reason: " +
                     ", ".join(f"{n} {v:.2f}" for n, v in r["by_reason"].items() if v))
    for name, bins in f.get("sb2_recall", {}).items():
        lines.append(f"    sb2 recall by {name}: " + ", ".join(f"{b} {r:.2f} ({n})" for b, (n, r) in bins.items() if n))
    lines.append(f"  z-score spread among unflagged in-distribution stars the model never fitted ({f['z_std_stars']}; "
                 "all / S/N 15-25 / 25-50 / >50), and [training stars]:")
    for k, row in f["z_std"].items():
        lines.append(f"    {k:<8} " + "  ".join(f"{v:.2f}" for v in row.values()) + "   [" +
                     "  ".join(f"{v:.2f}" for v in f["z_std_train"][k].values()) + "]")
    nb = f["no_bp"]
    lines.append(f"  no-BP stars never fitted ({nb['n']}): RMSE ratio to the others " +
                 ", ".join(f"{k} {nb['rmse'][k] / nb['rmse_others'][k]:.2f}" for k in f["labels"]))
    return "\n".join(lines)


def refit_champion(cfg, ens) -> None:
    """Refit a finished run's champion ``ens`` in place with the current post-training code (mean correction,
    trust thresholds, calibration; its own emulator kept), on the run's validation stars as the trainer fits
    them (then the calibration on the validation and test stars, :func:`stellar.train.calibrate_on_held_out`).
    Shared by ``--refit`` here and in benchmarks/accuracy.py."""
    from stellar.ensemble import load_split
    from stellar.instruments import load_instrument
    from stellar.tables import TableStore
    from stellar.train import calibrate_on_held_out, fit_trust_and_calibration, selection_table

    selection, _ = selection_table(cfg, TableStore(cfg.preprocess.output_dir).current_version())
    root = cfg.preprocess.output_dir
    val = load_split(root, "validation", ens.labels, ens.stats)
    fit_trust_and_calibration(cfg, ens, load_instrument(cfg.instrument, cfg.conf_dir), selection, val,
                              fit_emulator=False)
    calibrate_on_held_out(cfg, ens, selection, val, load_split(root, "test", ens.labels, ens.stats))


def refit_predictions(work: Path, sets: list[str]):
    """The run's champion with trust and calibration refitted by the current code: its predictions.
    ``sets``: the run's ``--set`` overrides (e.g. ``train.ood_false_flag_rate``), applied as the run applied them."""
    from stellar.config import load_config
    from stellar.predict import ModelBundle, predict
    from stellar.registry import load_registered

    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", *sets])
    ens, ident = load_registered(cfg, "champion")
    refit_champion(cfg, ens)
    with tempfile.TemporaryDirectory(prefix="stellar-trust-refit-") as out:
        c = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}", *sets, f"predict.output_dir={out}"])
        predict(c, ModelBundle(ident["name"], ident["version"], ident["run_id"], ens.to_files()), spark=None)
        return read_table(out, "predictions").to_pandas()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stars", type=int, default=None, help="survey size (default 20000; 30000 with --hard)")
    ap.add_argument("--hard", action="store_true", help="the hard survey variant (see above)")
    ap.add_argument("--work", default=None, help="a folder with a finished pipeline run (else one is made)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--refit", action="store_true",
                    help="re-assess the finished run in --work with the current trust and calibration code")
    args = ap.parse_args()
    if args.refit and not (args.work and (Path(args.work) / "pipeline-summary.json").is_file()):
        sys.exit("--refit needs --work with a finished pipeline run")
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-trust-"))
    stars = args.stars or (30000 if args.hard else 20000)
    sets = HARD_SETS if args.hard else []
    if not (work / "pipeline-summary.json").is_file():
        run_pipeline(work, stars, sets + args.overrides)
    f = figures(work, refit_predictions(work, sets + args.overrides) if args.refit else None)
    print(report(f))
    if args.json:
        Path(args.json).write_text(json.dumps(f, indent=1) + "\n")


if __name__ == "__main__":
    main()
