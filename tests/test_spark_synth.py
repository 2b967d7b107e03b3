"""The distributed generator: Spark tasks, any partitioning, the spark-submit entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

from stellar.runtime import SparkExecutor
from stellar.synth.survey import run_survey

from conftest import ROOT, small_config
from test_synth import tree_digest

pytestmark = pytest.mark.spark


def test_spark_output_is_identical_whatever_the_partitioning(spark, tmp_path, rvs_instrument):
    """Spark tasks (one BLAS thread each) write the bytes of the in-process run under 1 and under 2 BLAS threads."""
    cfg = small_config(tmp_path, n_stars=450, stars_per_file=150)
    refs = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads):
            refs.append(tree_digest(Path(run_survey(cfg.synth, rvs_instrument,
                                                    out_dir=str(tmp_path / f"local{threads}"))["path"])))
    assert refs[0] == refs[1]
    digests = []
    for parts in (1, 2, 3):
        m = run_survey(cfg.synth, rvs_instrument, executor=SparkExecutor(spark, "stellar synth", parts),
                       out_dir=str(tmp_path / f"spark{parts}"))
        assert m["n_stars"] == 450 and m["n_files"] == 3
        digests.append(tree_digest(Path(m["path"])))
    assert digests[0] == digests[1] == digests[2] == refs[0]


@pytest.mark.slow
def test_spark_submit_entry_point(tmp_path, rvs_instrument):
    """jobs/synth.py under spark-submit (local master) writes what the library writes in-process."""
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    submit = Path(sys.executable).with_name("spark-submit")
    cmd = [str(submit), "--master", "local[2]", str(ROOT / "jobs" / "synth.py"),
           "--config", str(ROOT / "conf" / "local.yaml"), "--stars", "300",
           "--set", f"work_dir={tmp_path}", "--set", "synth.stars_per_file=150"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stars 300 in 2 HEALPix-range files" in out.stdout
    cfg = small_config(tmp_path / "ref", n_stars=300, stars_per_file=150)
    ref = run_survey(cfg.synth, rvs_instrument)
    assert tree_digest(tmp_path / "synth") == tree_digest(Path(ref["path"]))
