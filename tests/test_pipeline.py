"""The one-command pipeline: stage choice, resuming after a kill mid-stage, skipping what is up to date."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stellar.config import load_config
from stellar.pipeline import PipelineError, choose_stages
from stellar.tables import read_table

from conftest import ROOT

SETS = ["synth.n_stars=4000", "synth.stars_per_file=500", "synth.training_fraction=0.5", "train.members=2",
        "train.model_overrides={max_epochs: 2, patience: 2, pretrain_epochs: 1}", "select.place_batch=500",
        "promote.max_z_std_error=10", "predict.batch_size=32"]


def _cmd(work: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "stellar.cli", "pipeline", "--no-spark", "--config", str(ROOT / "conf" / "local.yaml"),
            "--set", f"work_dir={work}"]
    for s in SETS:
        args += ["--set", s]
    return args + list(extra)


def test_stage_choice():
    cfg = load_config(ROOT / "conf" / "local.yaml", ["work_dir=/tmp/x"])
    assert choose_stages(cfg)[0] == "synth"  # gaia_root is the synthetic survey: the demo
    assert choose_stages(cfg, "predict") == ["predict", "report"]
    assert choose_stages(cfg, only=["train", "ingest"]) == ["ingest", "train"]
    real = load_config(ROOT / "conf" / "local.yaml", ["work_dir=/tmp/x", "ingest.gaia_root=/archive/gaia"])
    assert "synth" not in choose_stages(real)
    with pytest.raises(PipelineError, match="unknown stage 'trian'"):
        choose_stages(cfg, "trian")


def _outputs(work: Path) -> dict:
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={work}"])
    rvs = read_table(cfg.ingest.output_dir, "rvs", ["source_id", "flux"]).sort_by("source_id")
    feats = read_table(cfg.preprocess.output_dir, "features", ["source_id", "spectrum", "split"]).sort_by("source_id")
    sel = read_table(cfg.select.output_dir, "selection", ["source_id", "train_like", "x"]).sort_by("source_id")
    pred = read_table(cfg.predict.output_dir, "predictions", ["source_id", "teff", "m_h_err"]).sort_by("source_id")
    return {"rvs": rvs, "features": feats, "selection": sel, "predictions": pred}


@pytest.mark.slow
def test_killed_mid_stage_then_rerun_gives_the_uninterrupted_outputs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ref = tmp_path / "ref"
    assert subprocess.run(_cmd(ref), env=env, capture_output=True, text=True, timeout=900).returncode == 0

    work = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(work), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    tables = work / "tables"
    deadline = time.time() + 600
    # kill once the ingest stage has finished some tasks of its new version, before it commits
    while time.time() < deadline and proc.poll() is None:
        if any(tables.glob("v000001/_done/*.json")) and not (tables / "_CURRENT").exists():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the pipeline finished before it could be killed mid-stage"
    assert not (tables / "_CURRENT").exists() and any(tables.glob("v000001/rvs/*/*.parquet"))

    again = subprocess.run(_cmd(work), env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "[pipeline] synth: skipped" in again.stdout and "[pipeline] ingest: ran" in again.stdout
    # the restart plan: the rerun carried on in the killed run's version, skipping its finished tasks
    run = json.loads((tables / "_runs" / "v000001.json").read_text())
    assert run["resumed"] and 1 <= run["tasks_resumed"] < run["tasks"], run
    a, b = _outputs(ref), _outputs(work)
    for name in a:
        assert a[name].num_rows == b[name].num_rows > 0, name
    for name, cols in (("rvs", ["source_id", "flux"]), ("features", ["source_id", "spectrum", "split"]),
                       ("selection", ["source_id", "train_like", "x"]),
                       ("predictions", ["source_id", "teff", "m_h_err"])):
        for col in cols:  # NaN-aware: flux keeps the archive's NaN pixels
            x, y = a[name][col], b[name][col]
            if hasattr(x.type, "value_type"):
                x, y = x.combine_chunks().flatten(), y.combine_chunks().flatten()
            x, y = x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False)
            same = np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
            assert same, (name, col)

    # a third run finds everything up to date and retrains nothing
    third = subprocess.run(_cmd(work), env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0
    for stage in ("synth", "ingest", "preprocess", "select", "train", "promote", "predict", "report"):
        assert f"[pipeline] {stage}: skipped" in third.stdout, (stage, third.stdout[-3000:])
    summary = json.loads((work / "pipeline-summary.json").read_text())
    assert summary["stages"]["report"]["status"] == "skipped" and len(summary["stages"]["report"]["figures"]) == 9
    assert (work / "report" / "index.html").is_file()


@pytest.mark.spark
def test_progress_line_follows_a_running_spark_job(spark):
    import io
    import threading

    from stellar.pipeline import Progress

    progress = Progress(stream=io.StringIO())
    progress.spark = spark
    progress.start("ingest", stars=1000)
    done = threading.Event()

    def job():
        # 8 one-second tasks on 2 slots: several seconds with some, not all, tasks done (the status
        # tracker is fed asynchronously, so a short job could end before it shows progress)
        spark.sparkContext.parallelize(range(8), 8).map(lambda x: __import__("time").sleep(1.0) or x).collect()
        done.set()

    threading.Thread(target=job, daemon=True).start()
    lines = []
    while not done.is_set():
        line = progress.line()
        if line:
            lines.append(line)
        time.sleep(0.1)
    progress.stop()
    # before the job's first task shows, the line says the stage works on the driver; then it follows the tasks
    tasks = [line for line in lines if line.startswith("  [ingest] tasks ")]
    assert tasks and all("/8 (" in line for line in tasks)
    assert all(line.startswith("  [ingest] working on the driver, ") for line in lines[:lines.index(tasks[0])])
    assert any("stars/s" in line and "ETA" in line for line in lines)  # once some tasks are done
    progress.spark = None  # no session yet (sessions are built lazily): the line still says what goes on
    assert progress.line().startswith("  [ingest] starting, ")
