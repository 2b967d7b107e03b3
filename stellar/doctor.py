"""``stellar doctor``: what this installation will run with."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys

from stellar.config import StellarConfig
from stellar.java import SUPPORTED_MAJORS, find_java
from stellar.tracking import redact

PACKAGES = ("stellar", "pyspark", "torch", "pyarrow", "numpy", "pandas", "astropy", "astropy-healpix",
            "mlflow", "scikit-learn", "scipy", "openTSNE", "umap-learn", "pydantic", "safetensors")


def gpu_report() -> list[str]:
    """One line per CUDA device torch sees, or one line saying why there is none."""
    try:
        import torch
    except ImportError:
        return ["torch not importable"]
    if not torch.cuda.is_available():
        return [f"none visible to torch (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"]
    return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


def report(cfg: StellarConfig, spark_check: bool = False) -> tuple[list[str], bool]:
    """Lines to print and whether everything needed is present."""
    ok = True
    lines = [f"python          {platform.python_version()} ({sys.executable})"]
    for pkg in PACKAGES:
        try:
            lines.append(f"{pkg:<16}{md.version(pkg)}")
        except md.PackageNotFoundError:
            lines.append(f"{pkg:<16}MISSING")
            ok = False
    java = find_java()
    if java is None:
        lines.append("java            MISSING (need 17 or 21; run 'python -m stellar.java --ensure')")
        ok = False
    else:
        note = "" if java.major in SUPPORTED_MAJORS else " (untested with Spark 4)"
        lines.append(f"java                {java.version} at {java.home} (from {java.source}){note}")
    lines += [
        f"work_dir        {cfg.work_dir}",
        f"spark           master={cfg.spark.master}",
        f"mlflow          tracking={redact(cfg.mlflow.tracking_uri)} model={cfg.mlflow.model_name}",
        f"instrument      {cfg.instrument}",
    ]
    lines += [f"gpu             {g}" for g in gpu_report()]
    if spark_check and ok:
        from stellar.spark import build_session

        spark = build_session(cfg, "doctor")
        n = spark.range(0, 1000, numPartitions=4).selectExpr("sum(id) as s").collect()[0]["s"]
        lines.append(f"spark run       ok: version {spark.version}, default parallelism "
                     f"{spark.sparkContext.defaultParallelism}, test sum {n}")
        spark.stop()
    return lines, ok
