"""A trained model on the six real Gaia DR3 RVS spectra of ../shared/data/real/gaiaspec_rvs (RVS alone).

    .venv/bin/python benchmarks/real_spectra.py --work DIR [--model champion]

DIR is a finished `stellar pipeline` run (its MLflow registry holds the model). In a side folder
DIR/real-rvs, with MLflow pointed at DIR's registry, it runs `stellar pipeline --only
ingest,preprocess,predict` on the six DataLink CSV downloads (no XP, no astrometry, no labels: what a
user with only these downloads has), then prints each star's labels, uncertainties, `ood` and the
decoded `ood_reason`, and the consistency statistics. The literature column says what the star is
(PROVENANCE.md): the dwarfs Kepler-93 (Teff ~5670 K, log g 4.47) and Kepler-409 should be told from the
evolved HD 176650 in log g, or flagged with a reason.

The real files are credited to ESA/Gaia/DPAC and were published with Angelo et al. (2024), repository
isabelangelo/gaiaspec (MIT); they are read from ../shared and never copied into the project.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stellar.tables import read_table  # noqa: E402
from stellar.trust import OOD_BITS  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real" / "gaiaspec_rvs"
STARS = {  # file stem: what the source repository's README and PROVENANCE.md say
    "Kepler-93": "dwarf, Teff ~5670 K, log g 4.47",
    "Kepler-409": "main-sequence dwarf",
    "HD176650": "evolved star",
    "KOI-001": "noisy spectrum (S/N ~21)",
    "GaiaDR3-1535964555128078720": "unresolved binary",
    "GaiaDR3-3174658066485297152": "active star",
}


def decode(reason: int | None) -> str:
    if reason is None:
        return "-"
    return "+".join(name for name, (bit, _) in OOD_BITS.items() if reason & bit) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a finished pipeline run (its registry holds the model)")
    ap.add_argument("--model", default="champion", help="alias or version of the registered model")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    if not REAL.is_dir():
        sys.exit(f"no real spectra at {REAL} (see ../shared/data/real/PROVENANCE.md)")
    files = sorted(str(REAL / f"{stem}.csv") for stem in STARS)
    side = work / "real-rvs"
    cmd = [sys.executable, "-m", "stellar.cli", "pipeline", "--config", str(ROOT / "conf" / "local.yaml"),
           "--only", "ingest", "--only", "preprocess", "--only", "predict",
           "--set", f"work_dir={side}", "--set", "ingest.gaia_root=null", "--set", "ingest.labels=[]",
           "--set", f"ingest.datalink=[{','.join(files)}]", "--set", "ingest.verify_md5=false",
           "--set", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
           "--set", f"mlflow.artifact_root={work}/mlartifacts", "--set", f"predict.model={args.model}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"pipeline failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    pred = read_table(side / "predictions", "predictions").to_pandas()
    ids = {}
    for stem in STARS:
        with open(REAL / f"{stem}.csv") as fh:
            ids[int(next(csv.DictReader(fh))["source_id"])] = stem
    rows = []
    for _, r in pred.iterrows():
        stem = ids.get(int(r.source_id), "?")
        rows.append({"star": stem, "source_id": int(r.source_id), "note": STARS.get(stem, ""),
                     **{k: (None if r[k] != r[k] else float(r[k])) for k in
                        ("teff", "teff_err", "logg", "logg_err", "m_h", "m_h_err", "spectrum_chi2", "line_chi2",
                         "line_broadening")},
                     "ood": None if r.ood != r.ood else bool(r.ood),
                     "ood_reason": None if r.ood_reason != r.ood_reason else int(r.ood_reason)})
    rows.sort(key=lambda x: list(STARS).index(x["star"]) if x["star"] in STARS else 99)
    print(f"{len(rows)} real RVS spectra, model {args.model} of {work}")
    print(f"  {'star':<28} {'Teff':>12} {'log g':>12} {'[M/H]':>12} {'chi2':>7} {'line':>7} {'broad':>6}  ood  reason")
    for x in rows:
        f = lambda v, e, d: "-" if v is None else f"{v:.{d}f}+-{e:.{d}f}"  # noqa: E731
        print(f"  {x['star']:<28} {f(x['teff'], x['teff_err'], 0):>12} {f(x['logg'], x['logg_err'], 2):>12} "
              f"{f(x['m_h'], x['m_h_err'], 2):>12} {x['spectrum_chi2'] or float('nan'):7.1f} "
              f"{x['line_chi2'] or float('nan'):7.1f} {x['line_broadening'] or float('nan'):6.1f}  "
              f"{str(x['ood']):<5} {decode(x['ood_reason'])}  ({x['note']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
