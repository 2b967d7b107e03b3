"""Are two pipeline runs' outputs the same? For a refactor that must change no output.

    .venv/bin/python benchmarks/compare_runs.py WORK_A WORK_B

Compares the committed versions of two work folders (say ``make demo`` before and after a change,
same seed): the ``tables``, ``features`` and ``selection`` parts byte for byte (same file names, same
sha256), and the ``predictions`` by content, row by row after sorting by source_id, every column but
``model_run_id`` (an MLflow run id differs between any two runs) and ``hpx`` (derived from source_id);
floats compared exactly (NaN equal to NaN), types included. Prints one line per store; exits 1 when
anything differs.
"""
import hashlib, sys
from pathlib import Path
import numpy as np
import pyarrow.parquet as pq
import pyarrow.compute as pc

a, b = Path(sys.argv[1]), Path(sys.argv[2])

def current(root):
    import json
    return root / json.loads((root / "_CURRENT").read_text())["version"]

ok = True
for store in ("tables", "features", "selection"):
    va, vb = current(a / store), current(b / store)
    fa = {str(p.relative_to(va)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(va.rglob("*.parquet"))}
    fb = {str(p.relative_to(vb)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(vb.rglob("*.parquet"))}
    same = fa == fb
    ok &= same
    print(f"{store}: {len(fa)} parts vs {len(fb)}, byte-identical: {same}")
    if not same:
        print("  differ:", [k for k in fa if fa.get(k) != fb.get(k)][:5], set(fa) ^ set(fb))
pa_ = pq.read_table(current(a / "predictions") / "predictions").sort_by("source_id")
pb_ = pq.read_table(current(b / "predictions") / "predictions").sort_by("source_id")
skip = {"model_run_id", "hpx"}
cols = [c for c in pa_.column_names if c not in skip]
print("prediction columns only in one:", set(pa_.column_names) ^ set(pb_.column_names))
for c in cols:
    if c not in pb_.column_names:
        continue
    x, y = pa_[c].combine_chunks(), pb_[c].combine_chunks()
    if x.type != y.type:
        print("  type differs", c, x.type, y.type); ok = False; continue
    if x.type.__class__.__name__.startswith("Float") or str(x.type) in ("float", "double"):
        same = np.array_equal(x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False), equal_nan=True)
    else:
        same = x.equals(y)
    if not same:
        ok = False
        print("  predictions differ in", c)
ok &= pa_.num_rows == pb_.num_rows
print(f"predictions: {pa_.num_rows} vs {pb_.num_rows} rows; everything compared identical: {ok}")
sys.exit(0 if ok else 1)
