"""Network variants trained on a finished run's features, against its default preset, in one run.

    .venv/bin/python benchmarks/variants.py --work DIR [--set KEY=VALUE ...] [--members 2] \
        --variant 'nodrop={"dropout": 0.0}' --variant 'wd={"weight_decay": 1e-4}'

DIR is a finished `stellar pipeline` run (e.g. `benchmarks/trust.py --hard --work DIR`; pass the
run's own ``--set`` overrides again, e.g. those of ``--hard``). For the default preset ("base") and
each ``--variant NAME=JSON`` (``train.model_overrides`` on top of the run's), it trains an ensemble
of ``--members`` members on the run's training split exactly as the train stage does (nothing is
registered; the MLflow store is a side file in DIR), and prints the RMSE against the generator's
truth per label and S/N bin (15-25, 25-50, > 50, all) on every in-distribution star outside the
training and validation splits, with each variant's ratio to "base". The same seeds are used for
every variant, but members' early stopping makes two ensembles of 2 members differ by about +-10 %
in a cell: read differences smaller than that as noise, or use more members.

Each ensemble's figures are kept in DIR/variants/NAME-mMEMBERS.json with what decides them: the
overrides, the members, the run's features, the git trees of ``stellar/`` and ``conf/``, and the
machine's CPU. ``--reuse-base`` takes "base" from that record instead of training it again (4 members
with pre-training: about 20 minutes on 2 cores) when all of these match. Training is deterministic on
one machine with one code, but not across CPUs (another CPU's floating-point paths give other
members), so a record from another machine or other code is refused and the base is trained again.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stellar.config import load_config  # noqa: E402
from stellar.instruments import load_instrument  # noqa: E402
from stellar.tables import TableStore, load_stats  # noqa: E402
from stellar.train import train_ensemble  # noqa: E402
from stellar.ensemble import load_split  # noqa: E402

BINS = (("15-25", 15, 25), ("25-50", 25, 50), (">50", 50, np.inf), ("all", 0, np.inf))


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, body = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=JSON, e.g. 'nodrop={{\"dropout\": 0}}'")
    try:
        overrides = json.loads(body)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--variant {name}: not JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"--variant {name}: the JSON must be an object")
    return name, overrides


def cpu_model() -> str:
    """The machine's CPU model (from /proc/cpuinfo where there is one): what makes training reproducible."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_trees() -> str:
    """The git trees of the code and presets that train (``stellar/``, ``conf/``), "+dirty" where tracked
    files there differ from them ("unknown" off git): a commit that touches neither keeps a record valid."""
    try:
        trees = [subprocess.run(["git", "rev-parse", f"HEAD:{d}"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()[:12] for d in ("stellar", "conf")]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "stellar", "conf"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return "/".join(trees) + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record_key(members: int, overrides: dict, sets: list[str], features_root: str) -> dict:
    """What decides an ensemble's figures on a run: compared whole before a record is reused. The features
    table's content digest stands for the run's data (a pipeline rerun into the same folder that changed
    them changes it)."""
    return {"members": members, "overrides": overrides, "sets": sorted(sets),
            "features": TableStore(features_root).content_digest(), "code": code_trees(), "cpu": cpu_model()}


def save_record(path: Path, key: dict, row: dict) -> None:
    body = {"key": key, "seconds": row["seconds"], "labels": row["labels"],
            "rmse": [[lab, b, v] for (lab, b), v in row["rmse"].items()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1))


def load_record(path: Path, key: dict) -> dict | None:
    """The figures recorded at ``path`` if its key equals ``key`` (else None, saying why)."""
    if not path.is_file():
        return None
    if key["code"].endswith("+dirty") or key["code"] == "unknown":
        print(f"{path}: not reused: the code is {key['code']}, so a record cannot say it matches", flush=True)
        return None
    body = json.loads(path.read_text())
    if body.get("key") != key:
        print(f"{path}: recorded for {body.get('key')}, not {key}: training the base again", flush=True)
        return None
    return {"rmse": {(lab, b): v for lab, b, v in body["rmse"]}, "seconds": body["seconds"],
            "overrides": {}, "labels": body["labels"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a finished pipeline run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="the run's own config overrides (as given to the pipeline)")
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="NAME=JSON")
    ap.add_argument("--reuse-base", action="store_true",
                    help="take the base's figures from DIR/variants/ where the same code on the same CPU "
                         "recorded them for the same members and overrides")
    args = ap.parse_args()
    work = Path(args.work)
    if not (work / "pipeline-summary.json").is_file():
        sys.exit(f"{work}: not a finished pipeline run (no pipeline-summary.json)")
    base = [f"work_dir={work}", *args.overrides]
    cfg0 = load_config(ROOT / "conf" / "local.yaml", base)
    inst = load_instrument(cfg0.instrument, cfg0.conf_dir)
    root = cfg0.preprocess.output_dir
    stats = load_stats(root)
    truth_t = pq.read_table(work / "synth" / "truth").to_pandas().set_index("source_id")
    evals = None
    rows: dict[str, dict] = {}
    for name, ov in [("base", {}), *args.variant]:
        overrides = dict(cfg0.train.model_overrides, **ov)
        key = record_key(args.members, overrides, args.overrides, root)
        record = work / "variants" / f"{name}-m{args.members}.json"
        if name == "base" and args.reuse_base and (row := load_record(record, key)) is not None:
            rows[name] = row
            print(f"base: {args.members} members, figures reused from {record}", flush=True)
            continue
        cfg = load_config(ROOT / "conf" / "local.yaml", base + [
            f"train.members={args.members}", f"train.model_overrides={json.dumps(overrides)}",
            "train.register_model=false", f"mlflow.tracking_uri=sqlite:///{work}/mlflow-variant-{name}.db",
            f"mlflow.artifact_root={work}/mlartifacts-variant-{name}"])
        t = time.perf_counter()
        ens = train_ensemble(cfg, inst, log_mlflow=False)["ensemble"]
        seconds = time.perf_counter() - t
        labels = ens.labels
        if evals is None:  # the evaluated stars: built once, shared by every ensemble trained here
            parts = [load_split(root, sp, labels, stats) for sp in ("test", "observed")]
            parts = [p for p in parts if p]
            evals = {k: np.concatenate([p[k].numpy() for p in parts]) for k in ("source_id", "snr")}
            evals["tensors"] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            keep = ~truth_t.loc[evals["source_id"], "is_ood"].to_numpy(bool)
            evals["keep"] = keep
            evals["truth"] = truth_t.loc[evals["source_id"], labels].to_numpy(float)
            evals["no_bp"] = (~truth_t.loc[evals["source_id"], "has_bp"].to_numpy(bool)
                              if "has_bp" in truth_t.columns else np.zeros(len(keep), bool))
        pred = ens.predict(evals["tensors"])["mean"]
        keep, truth, snr = evals["keep"], evals["truth"], evals["snr"]
        rmse = {}
        for j, lab in enumerate(labels):
            for b, lo, hi in BINS:
                sel = keep & np.isfinite(truth[:, j]) & (snr >= lo) & (snr < hi)
                rmse[(lab, b)] = float(np.sqrt(np.mean((pred[sel, j] - truth[sel, j]) ** 2))) if sel.sum() else np.nan
            # the trust issue's no-BP figure: stars without BP coefficients over the others, all S/N
            sel = keep & np.isfinite(truth[:, j])
            nb = evals["no_bp"]
            rmse[(lab, "noBP/others")] = (float(np.sqrt(np.mean((pred[sel & nb, j] - truth[sel & nb, j]) ** 2))
                                                / np.sqrt(np.mean((pred[sel & ~nb, j] - truth[sel & ~nb, j]) ** 2)))
                                          if (sel & nb).any() else np.nan)
        rows[name] = {"rmse": rmse, "seconds": seconds, "overrides": ov, "labels": labels}
        save_record(record, key, rows[name])
        print(f"{name}: {args.members} members in {seconds:.0f} s, overrides {ov}", flush=True)
    labels = rows["base"]["labels"]
    if evals is None:
        print("nothing trained: every ensemble's figures were reused")
        return
    print(f"RMSE on {int(evals['keep'].sum())} in-distribution stars (test split + observed), per S/N bin "
          "15-25 / 25-50 / >50 / all, and the ratio to base; then the RMSE of the "
          f"{int((evals['keep'] & evals['no_bp']).sum())} of them without BP over the others' (trust issue: <= 1.5):")
    for name, r in rows.items():
        print(f"  {name}")
        for lab in labels:
            vals = [r["rmse"][(lab, b)] for b, *_ in BINS]
            ratio = [r["rmse"][(lab, b)] / rows["base"]["rmse"][(lab, b)] for b, *_ in BINS]
            fmt = (lambda v: f"{v:7.1f}") if lab == "teff" else (lambda v: f"{v:7.4f}")
            print(f"    {lab:<8}" + " ".join(fmt(v) for v in vals) + "   x " + " ".join(f"{x:.2f}" for x in ratio)
                  + f"   noBP {r['rmse'][(lab, 'noBP/others')]:.2f}")


if __name__ == "__main__":
    main()
