"""Wall time per stage of the one-command pipeline.

    .venv/bin/python benchmarks/pipeline.py [--stars 20000] [--work DIR] [--set KEY=VALUE ...]

Runs `stellar pipeline` (Spark local[*], the embedded default config) on a
generated survey of --stars stars in a fresh work folder (or --work), then
prints each stage's wall time and share, from pipeline-summary.json, and the
stars/s of the whole run. A second run in the same folder shows the cost of a
rerun where every stage is up to date. ``--figures DIR`` keeps the report's
figures (the README shows the demo-size ones, ``benchmarks/figures/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(work: Path, stars: int, sets: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "stellar.cli", "pipeline", "--config", str(ROOT / "conf" / "local.yaml"),
           "--set", f"work_dir={work}", "--set", f"synth.n_stars={stars}"]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"pipeline failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads((work / "pipeline-summary.json").read_text()), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=20000)
    ap.add_argument("--work", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--figures", default=None, metavar="DIR",
                    help="copy the report's figures and report.json here (the README's come from the demo size)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stellar-bench-pipeline-"))
    first, wall = run(work, args.stars, args.overrides)
    again, wall2 = run(work, args.stars, args.overrides)
    total = sum(s["seconds"] for s in first["stages"].values())
    print(f"pipeline benchmark: {args.stars} stars, Spark local[*]; process wall {wall:.0f} s "
          f"({args.stars / wall:.0f} stars/s end to end)")
    print(f"  {'stage':<11} {'seconds':>8} {'share':>6}   rerun (all up to date)")
    for name, s in first["stages"].items():
        r = again["stages"].get(name, {})
        print(f"  {name:<11} {s['seconds']:8.1f} {s['seconds'] / total:6.1%}   {r.get('seconds', 0):6.1f} s "
              f"{r.get('status', '')}")
    print(f"  {'total':<11} {total:8.1f}            rerun process wall {wall2:.0f} s")
    if args.figures:
        dest = Path(args.figures)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((work / "report").glob("*.png")) + [work / "report" / "report.json"]:
            shutil.copy2(f, dest / f.name)
        print(f"  report figures copied to {dest}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
